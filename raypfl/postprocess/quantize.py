"""Unbiased stochastic quantization, per bucket, to 8 or 4 bits.

Each bucket of `bucket` consecutive values is sent as its minimum `lo` and step s = (max - lo) / L
(L = 2^bits - 1 levels above lo) as two float32, and one `bits`-bit level q per value, where q is
floor((x - lo) / s) rounded up with probability equal to the fractional part, so E[lo + q s] = x.
QSGD (Alistarh, Grubic, Li, Tomioka, Vojnovic, NeurIPS 2017, Lemma 3.1) is the reference for the
unbiasedness of stochastic rounding; this is the min-max uniform-grid variant rather than QSGD's
norm-scaled one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raypfl.config import knob
from raypfl.errors import ConfigError
from raypfl.postprocess.base import ClientStep, Wire

BITS = (8, 4)


@dataclass
class StochasticQuantize(ClientStep):
    """Quantize the update (or, after top-k, only the kept values) to `bits` bits per value.

    Wire: bits=`bits` per value plus 8 header bytes per bucket (min and step, float32). Returns the
    dequantized float32 vector. Its randomness is the step's rng, keyed on (root, round, client, step).
    """

    name = "quantize"
    may_raise_norm = True  # rounding up can lengthen a clipped update
    bits: int = knob(8, expect="8 or 4")
    bucket: int = knob(512, ge=1)

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ConfigError(f"quantize.bits={self.bits} must be 8 or 4")

    def apply(
        self, vector: np.ndarray, wire: Wire, state: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, Wire, np.ndarray | None, dict[str, float]]:
        values = vector if wire.support is None else vector[wire.support]
        n = values.size
        if n == 0:
            return vector, wire, None, {}
        levels = (1 << self.bits) - 1
        starts = np.arange(0, n, self.bucket)
        lo32 = np.minimum.reduceat(values, starts).astype(np.float32)
        hi = np.maximum.reduceat(values, starts).astype(np.float64)
        lo = lo32.astype(np.float64)
        step32 = ((hi - lo) / levels).astype(np.float32)
        # the float32 step must reach the maximum, or the top values would be clipped (a bias)
        short = lo + levels * step32.astype(np.float64) < hi
        step32[short] = np.nextafter(step32[short], np.float32(np.inf))
        step = step32.astype(np.float64)
        per_value = np.repeat(np.arange(starts.size), np.diff(np.append(starts, n)))
        lo_v, step_v = lo[per_value], step[per_value]
        with np.errstate(divide="ignore", invalid="ignore"):
            scaled = np.where(step_v > 0, (values.astype(np.float64) - lo_v) / step_v, 0.0)
        floor = np.floor(scaled)
        level = floor + (rng.random(n) < scaled - floor)
        np.clip(level, 0, levels, out=level)
        decoded = (lo_v + level * step_v).astype(np.float32)
        if wire.support is None:
            out = decoded
        else:
            out = np.zeros_like(vector, dtype=np.float32)
            out[wire.support] = decoded
        quantized = Wire(
            values=wire.values,
            bits=self.bits,
            index_bytes=wire.index_bytes,
            header_bytes=wire.header_bytes + 8 * int(starts.size),
            support=wire.support,
        )
        return out, quantized, None, {}
