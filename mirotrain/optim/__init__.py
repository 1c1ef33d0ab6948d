"""Optimizers and the precision modes of the trained state (``master_weights``): what is kept in which dtype."""
