"""Differential privacy for DP-FedAvg: the accountant (noise multiplier to ε and back), on dp-accounting."""

from __future__ import annotations

from raypfl.privacy.accountant import PLD_RANDOM_MESSAGE, Accountant

__all__ = ["PLD_RANDOM_MESSAGE", "Accountant"]
