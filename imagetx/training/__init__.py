"""What the training loop uses: the optimizer and schedule, the run directory and resume,
signals, loggers, torch.compile with its fallback, and the metrics it reports."""
