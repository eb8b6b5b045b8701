"""Training: the loop, optimizer and LR schedule, metrics."""
