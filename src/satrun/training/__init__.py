"""The training loop and what it needs: optimizer, precision, metrics, display, saving."""
