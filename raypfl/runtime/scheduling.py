"""Which worker trains which client of a cohort."""

from __future__ import annotations

from collections.abc import Sequence


def assign_cohort(
    cohort: Sequence[int], sizes: Sequence[int], num_workers: int, sticky: bool
) -> list[list[int]]:
    """Split a cohort over workers.

    sticky: client c always goes to worker c % num_workers (its state lives there).
    otherwise: balance the work (samples) greedily, largest client first; ties go to the lowest worker.
    Deterministic; each worker's clients are returned in ascending order.
    """
    groups: list[list[int]] = [[] for _ in range(num_workers)]
    if sticky:
        for client in cohort:
            groups[client % num_workers].append(client)
    else:
        load = [0] * num_workers
        for client, size in sorted(zip(cohort, sizes), key=lambda cs: (-cs[1], cs[0])):
            worker = min(range(num_workers), key=lambda w: (load[w], w))
            groups[worker].append(client)
            load[worker] += size
    return [sorted(g) for g in groups]


def split_range(n: int, parts: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering 0..n in `parts` nearly equal, non-empty pieces (fewer if n < parts)."""
    parts = max(1, min(parts, n))
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))
