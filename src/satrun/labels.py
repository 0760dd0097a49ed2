"""The label of a position that carries no loss (prompt tokens, padding): torch's
``cross_entropy`` default ``ignore_index``, shared by the data, the loss and the probes."""

IGNORE = -100
