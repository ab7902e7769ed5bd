"""Gossip topologies and their doubly-stochastic mixing matrices (Metropolis-Hastings weights)."""

from __future__ import annotations

import math

import numpy as np

from raypfl import seeding


def neighbours(topology: str, nodes: int, degree: int = 3, seed: int = 0) -> list[set[int]]:
    """Each node's neighbours (undirected, no self-loops) in the named topology."""
    if topology == "ring":
        return [{(i - 1) % nodes, (i + 1) % nodes} - {i} for i in range(nodes)]
    if topology == "complete":
        return [set(range(nodes)) - {i} for i in range(nodes)]
    if topology == "torus":
        rows = max(r for r in range(1, math.isqrt(nodes) + 1) if nodes % r == 0)
        cols = nodes // rows
        out = []
        for i in range(nodes):
            r, c = divmod(i, cols)
            grid = {
                ((r + dr) % rows) * cols + (c + dc) % cols for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))
            }
            out.append(grid - {i})
        return out
    if topology == "random_regular":
        return _random_regular(nodes, degree, seeding.rng(seed, seeding.GOSSIP))
    raise ValueError(f"gossip.topology={topology} is not supported")


def _random_regular(
    nodes: int, degree: int, gen: np.random.Generator, attempts: int = 1000
) -> list[set[int]]:
    """A connected random `degree`-regular graph (configuration model, retried until simple and connected)."""
    for _ in range(attempts):
        stubs = gen.permutation(np.repeat(np.arange(nodes), degree))
        pairs = stubs.reshape(-1, 2)
        if np.any(pairs[:, 0] == pairs[:, 1]):
            continue
        edges = {tuple(sorted(map(int, p))) for p in pairs}
        if len(edges) < len(pairs):  # a repeated edge
            continue
        adj: list[set[int]] = [set() for _ in range(nodes)]
        for a, b in edges:
            adj[a].add(b)
            adj[b].add(a)
        if is_connected(adj):
            return adj
    raise ValueError(f"no connected {degree}-regular graph on {nodes} nodes found")


def is_connected(adj: list[set[int]]) -> bool:
    seen, frontier = {0}, [0]
    while frontier:
        for j in adj[frontier.pop()]:
            if j not in seen:
                seen.add(j)
                frontier.append(j)
    return len(seen) == len(adj)


def mixing_matrix(adj: list[set[int]]) -> np.ndarray:
    """Metropolis-Hastings weights: W_ij = 1 / (1 + max(d_i, d_j)) on edges, the rest on the diagonal.

    Symmetric with rows summing to 1, hence doubly stochastic, for any undirected graph.
    """
    n = len(adj)
    w = np.zeros((n, n))
    for i in range(n):
        for j in adj[i]:
            w[i, j] = 1.0 / (1 + max(len(adj[i]), len(adj[j])))
        w[i, i] = 1.0 - w[i].sum()
    return w


def spectral_gap(w: np.ndarray) -> float:
    """1 - |second largest eigenvalue|: how fast repeated mixing reaches consensus."""
    eig = np.sort(np.abs(np.linalg.eigvalsh(w)))[::-1]
    return float(1 - eig[1]) if len(eig) > 1 else 1.0
