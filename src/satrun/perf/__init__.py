"""Performance accounting: the FLOP and memory model behind `satrun plan`."""
