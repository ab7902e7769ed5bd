"""raypfl's Hydra launcher plugin: `hydra/launcher=ray` runs sweep jobs concurrently on one Ray."""
