"""Cohort assignment to workers and client selection."""

from __future__ import annotations

from raypfl.config import ClientsSpec
from raypfl.driver.selection import CohortSampler
from raypfl.runtime.scheduling import assign_cohort, split_range


def test_balanced_assignment_evens_out_samples():
    cohort = [3, 7, 11, 15, 19, 23]  # all odd: the sticky rule would put them all on worker 1
    sizes = [600, 500, 400, 300, 200, 100]
    groups = assign_cohort(cohort, sizes, 2, sticky=False)
    load = [sum(sizes[cohort.index(c)] for c in g) for g in groups]
    assert sorted(c for g in groups for c in g) == cohort
    assert abs(load[0] - load[1]) <= 100


def test_sticky_assignment_keeps_a_client_on_its_home_worker():
    groups = assign_cohort([3, 7, 8, 10], [1, 1, 1, 1], 2, sticky=True)
    assert groups == [[8, 10], [3, 7]]


def test_split_range_covers_without_gaps():
    assert split_range(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert split_range(2, 5) == [(0, 1), (1, 2)]


def test_random_selection_changes_per_round_fixed_does_not():
    rand = CohortSampler(ClientsSpec(num=100, per_round=10, selection="random"), seed=1)
    fixed = CohortSampler(ClientsSpec(num=100, per_round=10, selection="fixed"), seed=1)
    assert rand.cohort(1) != rand.cohort(2)
    assert rand.cohort(1) == CohortSampler(ClientsSpec(100, 10, "random"), seed=1).cohort(1)
    assert rand.cohort(1) != CohortSampler(ClientsSpec(100, 10, "random"), seed=2).cohort(1)
    assert fixed.cohort(1) == fixed.cohort(7)
    assert len(set(rand.cohort(3))) == 10 and all(0 <= c < 100 for c in rand.cohort(3))
