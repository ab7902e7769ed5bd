"""The driver: the round loop (experiment), cohort planning, selection, membership and load balancing."""
