"""A job's life as a process and its files: the run folder (lock, refusal), checkpoints (atomic, safe to
load), signals (SIGINT/SIGTERM) and the watchdog that stops leftover Ray processes."""
