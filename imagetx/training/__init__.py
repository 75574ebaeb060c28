"""What the training loop uses: the optimizer and schedule, the run directory and resume,
signals, loggers, and the metrics it reports."""
