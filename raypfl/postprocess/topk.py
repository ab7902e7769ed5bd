"""Top-k sparsification with error feedback.

Keep the k = ceil(fraction * d) entries of largest magnitude and zero the rest. With error feedback
(Stich, Cordonnier, Jaggi, NeurIPS 2018, "Sparsified SGD with memory"; Karimireddy et al., ICML 2019,
"Error feedback fixes SignSGD and other gradient compression schemes") a client adds what it did not send
last time (its residual e) before selecting, and keeps the new residual: sum(sent) + e_T = sum(raw).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from raypfl.config import knob
from raypfl.postprocess.base import ClientStep, Wire


def kept(fraction: float, d: int) -> int:
    """k = ceil(fraction * d), at least 1 and at most d (fraction * d is rounded to 9 decimals first, so
    0.07 * 100 keeps 7 entries, not 8)."""
    if d == 0:
        return 0
    return min(d, max(1, math.ceil(round(fraction * d, 9))))


def largest(magnitude: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the k largest entries of `magnitude`; ties at the k-th value go to the lowest
    indices, so the choice does not depend on the selection algorithm."""
    d = magnitude.size
    if k >= d:
        return np.arange(d)
    threshold = np.partition(magnitude, d - k)[d - k]  # the k-th largest value
    above = np.flatnonzero(magnitude > threshold)
    ties = np.flatnonzero(magnitude == threshold)[: k - above.size]
    return np.sort(np.concatenate([above, ties]))


@dataclass
class TopK(ClientStep):
    """Send the `fraction` of entries with the largest |value| (with `error_feedback`, of update + residual).

    Wire: k values and min(4k, ceil(d/8)) index bytes (4-byte indices or a d-bit bitmap, whichever is
    smaller; none when k = d); the kept indices are passed on in `Wire.support`, so quantize after top-k
    encodes only them.
    State (error feedback only): the float32 (d,) residual e, i.e. what was computed but not sent.
    """

    name = "topk"
    fraction: float = knob(0.01, gt=0, le=1)
    error_feedback: bool = knob(True)

    @property
    def stateful(self) -> bool:  # type: ignore[override]
        return self.error_feedback

    @property
    def may_raise_norm(self) -> bool:  # type: ignore[override]
        """With error feedback, update + residual can be longer than clip.bound."""
        return self.error_feedback

    def apply(
        self, vector: np.ndarray, wire: Wire, state: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, Wire, np.ndarray | None, dict[str, float]]:
        d = vector.size
        full = vector
        if self.error_feedback and state is not None:
            if state.shape != vector.shape:
                raise ValueError(
                    f"topk: the stored error-feedback residual has shape {state.shape}, the update "
                    f"{vector.shape} (did the model change?)"
                )
            full = (vector + state).astype(np.float32)
        k = kept(self.fraction, d)
        support = largest(np.abs(full), k)
        sent = np.zeros_like(full, dtype=np.float32)
        sent[support] = full[support]
        out = Wire(
            values=k,
            bits=wire.bits,
            index_bytes=min(4 * k, -(-d // 8)) if k < d else wire.index_bytes,
            header_bytes=wire.header_bytes,
            support=support if k < d else wire.support,
        )
        if not self.error_feedback:
            return sent, out, None, {}
        residual = (full - sent).astype(np.float32)
        return sent, out, residual, {"residual_norm": float(np.linalg.norm(residual.astype(np.float64)))}
