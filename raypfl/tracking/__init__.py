"""What a run leaves: progress lines, metrics.csv and clients.csv, plots, W&B, sweep reports, fault tables."""
