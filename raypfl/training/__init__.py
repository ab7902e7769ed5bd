"""Local training and evaluation loops (local) and lock-step clients (lockstep)."""
