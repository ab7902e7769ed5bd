"""The aggregator contract: a robust stand-in for the weighted mean, computed from STACKED client statistics.

The linear path (`raypfl.algorithms.aggregate.Aggregate`) sums `w * v` per client and never keeps a client's
vector. A robust rule needs them all: for each named statistic the server holds an (n, d) array, one row
per client (rows sorted by client id by the caller), and the (n,) client weights of that statistic.
`Aggregator.combine` maps these to one float64 (d,) estimate per statistic, which stands where the weighted
mean stood: `as_aggregate` turns the estimates into an ordinary `Aggregate` (totals = estimate * W,
weights = W), so `mean()` and `sum()` of every algorithm see the robust value unchanged.

Every rule here is deterministic: float64 arithmetic, column blocks of a fixed size, stable sorts, and ties
broken by the lowest row index. The same rows in the same order give the same bits. Rows must be finite: the
runtime rejects NaN/Inf updates before stacking them, as `Aggregate.add` does.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from raypfl.algorithms.aggregate import Aggregate, ClientUpdate

#: Named stacks: statistic name -> (n, d) array of the n clients' rows (or -> (n,) weights).
Stack = dict[str, np.ndarray]
#: Named estimates: statistic name -> float64 (d,) vector.
Estimates = dict[str, np.ndarray]

#: Columns processed at once when a rule converts rows to float64: n * COLUMNS * 8 bytes of scratch
#: (26 MB at n = 100), whatever d is. Fixed, so the blocks (and the bits) depend on d only.
COLUMNS = 1 << 15


@dataclass
class Aggregator:
    """Base class of aggregation rules. Subclasses declare their knobs as fields (`knob(...)`; config keys
    `aggregator.<field>`) and implement `combine`; `check` refuses knobs that cannot work for the cohort.

    `needs_stack` False means the rule is linear (the weighted mean) and the runtime can keep summing
    partials instead of stacking every client's vector.
    """

    name: ClassVar[str] = ""
    needs_stack: ClassVar[bool] = True

    def check(self, per_round: int) -> None:
        """Raise ConfigError (one line naming the key `aggregator.<field>`) if the knobs cannot work with
        cohorts of `per_round` clients. The default accepts any cohort."""

    def combine(
        self, vectors: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray]
    ) -> tuple[Estimates, dict[str, float]]:
        """(a float64 (d,) estimate per statistic, metrics) from `vectors[name]`, the (n, d) rows of the n
        clients (sorted by client id), and `weights[name]`, their (n,) weights for that statistic."""
        raise NotImplementedError


# --- helpers shared by the rules ---------------------------------------------------------------------------


def rows(vectors: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray]) -> int:
    """n, the number of clients in the stack; ValueError unless every statistic is an (n, d) array with
    (n,) finite, non-negative weights and n >= 1."""
    if not vectors:
        raise ValueError("no statistics to aggregate")
    if set(vectors) != set(weights):
        raise ValueError(
            f"statistics {sorted(vectors)} and weights {sorted(weights)} must name the same things"
        )
    counts = set()
    for name in sorted(vectors):
        x, w = vectors[name], np.asarray(weights[name])
        if x.ndim != 2 or w.shape != (x.shape[0],):
            raise ValueError(
                f"statistic {name!r}: vectors must be (n, d) and weights (n,), got {x.shape} and {w.shape}"
            )
        if not (np.isfinite(w).all() and (w >= 0).all()):
            raise ValueError(f"statistic {name!r}: weights must be finite and >= 0, got {w.tolist()}")
        counts.add(x.shape[0])
    if len(counts) != 1:
        raise ValueError(f"every statistic needs one row per client, got row counts {sorted(counts)}")
    n = counts.pop()
    if n < 1:
        raise ValueError("no client to aggregate (n = 0)")
    return n


def blocks(d: int) -> Iterator[slice]:
    """The column blocks (of COLUMNS columns) that cover d columns, in order."""
    for start in range(0, d, COLUMNS):
        yield slice(start, min(start + COLUMNS, d))


def transposed(x: np.ndarray, cols: slice) -> np.ndarray:
    """Columns `cols` of (n, d) rows as a contiguous float64 (len(cols), n) array: one coordinate's n values
    per row, so sorts and medians along axis 1 run over contiguous memory (several times faster than along
    axis 0 of the rows)."""
    return np.ascontiguousarray(x[:, cols].T, dtype=np.float64)


def middle(ordered: np.ndarray) -> np.ndarray:
    """The median of each row of an array sorted along axis 1 (for an even count, the mean of the two middle
    values: the bits of `np.median`, which is several times slower on short rows)."""
    n = ordered.shape[1]
    if n % 2:
        return ordered[:, n // 2].copy()
    return (ordered[:, n // 2 - 1] + ordered[:, n // 2]) / 2


def first_row(vectors: Mapping[str, np.ndarray]) -> Estimates:
    """The only client's statistics, as float64 copies (what every rule returns for n = 1)."""
    return {name: np.asarray(x[0], dtype=np.float64).copy() for name, x in vectors.items()}


def combination(x: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    """sum_i c_i x_i in float64 for (n, d) rows x and (n,) coefficients c, block by block."""
    c = np.asarray(coefficients, dtype=np.float64)
    out = np.empty(x.shape[1], dtype=np.float64)
    for cols in blocks(x.shape[1]):
        out[cols] = c @ x[:, cols].astype(np.float64)
    return out


def weighted_mean(x: np.ndarray, weights: np.ndarray, name: str = "") -> np.ndarray:
    """sum_i w_i x_i / sum_i w_i in float64; ValueError if the weights sum to 0."""
    w = np.asarray(weights, dtype=np.float64)
    total = float(w.sum())
    if total <= 0:
        raise ValueError(f"statistic {name!r}: the clients' weights sum to {total}, so it has no mean")
    return combination(x, w / total)


def squared_distances(vectors: Mapping[str, np.ndarray]) -> np.ndarray:
    """The (n, n) squared Euclidean distances between the clients' concatenated statistics, float64.

    Computed from a Gram matrix (||x||^2 + ||y||^2 - 2 x.y, clamped at 0), block by block; each block is
    first centred on its coordinate-wise median, which leaves the distances unchanged but keeps the inliers'
    norms small, so their distances lose no precision to outliers far away. Symmetric, zero diagonal.
    """
    n = next(iter(vectors.values())).shape[0]
    gram = np.zeros((n, n), dtype=np.float64)
    for name in sorted(vectors):
        x = vectors[name]
        for cols in blocks(x.shape[1]):
            block = x[:, cols].astype(np.float64)
            block -= middle(np.sort(transposed(x, cols), axis=1))
            gram += block @ block.T
    norms = np.diag(gram).copy()
    dist = norms[:, None] + norms[None, :] - 2.0 * gram
    dist = 0.5 * (dist + dist.T)
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, 0.0)
    return dist


def distances_to(vectors: Mapping[str, np.ndarray], point: Mapping[str, np.ndarray]) -> np.ndarray:
    """The (n,) Euclidean distances from each client's concatenated statistics to `point`, float64."""
    n = next(iter(vectors.values())).shape[0]
    total = np.zeros(n, dtype=np.float64)
    for name in sorted(vectors):
        x, p = vectors[name], point[name]
        for cols in blocks(x.shape[1]):
            diff = x[:, cols].astype(np.float64) - p[cols]
            total += np.einsum("ij,ij->i", diff, diff)
    return np.sqrt(total)


# --- the runtime's side: stacking updates, and the estimate as an Aggregate --------------------------------


def stack_updates(updates: Sequence[ClientUpdate]) -> tuple[Stack, Stack, list[int]]:
    """(vectors, weights, client ids) of some client updates, rows sorted by client id: what `combine`
    takes. The rows keep the clients' dtype (float32 stays float32: n * d * 4 bytes)."""
    ordered = sorted(updates, key=lambda u: u.client)
    if not ordered:
        raise ValueError("no client update to stack")
    names = sorted(ordered[0].statistics)
    for update in ordered:
        if sorted(update.statistics) != names:
            raise ValueError(
                f"client {update.client} sent statistics {sorted(update.statistics)}, "
                f"client {ordered[0].client} sent {names}: a stack needs the same ones from every client"
            )
    vectors = {name: np.stack([np.ravel(u.statistics[name]) for u in ordered]) for name in names}
    weights = {name: np.array([u.weights[name] for u in ordered], dtype=np.float64) for name in names}
    return vectors, weights, [u.client for u in ordered]


def as_aggregate(
    estimates: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray], clients: Sequence[int]
) -> Aggregate:
    """An Aggregate whose `mean(name)` is `estimates[name]` and whose total weight of each statistic is the
    clients' (totals = estimate * W): what an algorithm's server half reads, robust or not."""
    agg = Aggregate(clients=list(clients))
    for name in sorted(estimates):
        total = float(np.asarray(weights[name], dtype=np.float64).sum())
        agg.totals[name] = np.asarray(estimates[name], dtype=np.float64) * total
        agg.weights[name] = total
    return agg
