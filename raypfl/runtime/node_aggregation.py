"""Per-node pre-aggregation of a plain Ray round (`runtime.node_aggregation`).

Without it every busy client actor pushes its partial sum to the one parameter-server actor: the server
receives (busy actors) x (model bytes) per round. With it, the partials of the busy actors on one node are
summed on that node by the first of them (`ClientActor.sum_partials`: the others' partials are read from the
node's own object store), and ONE partial per node goes to the server: it receives (nodes) x (model bytes).
An actor, not a Ray task, does the sum: a `num_cpus=0` task pinned to the node took 5-9 s a round on the
local 4-node cluster (0.4 s without node sums), most likely a new Python worker per node each round (Ray
ends idle workers beyond a node's CPU count after about a second).

- `auto` (the default): every node with >= 2 busy actors, except the parameter server's own node (its
  actors' partials do not cross the network; a sum there would only add a hop).
- `always`: every node with >= 2 busy actors, the server's too (one node: one push a round).
- `never`: one push per busy actor.

Never with a robust aggregator (stacked updates, `FederationSetup.stacks`): a stack of n clients is as big
summed or not, so nothing would be saved. Only the plain path groups: the fault-tolerant rounds
(`raypfl.runtime.tolerant`) push per client so that a round can close on a quorum.

The server merges the pushes in their slot order; a node's sum is added in another grouping than the
per-actor pushes would be, which changes the float64 sums by rounding only (see the README).
"""

from __future__ import annotations

from collections.abc import Sequence

from raypfl.algorithms.aggregate import Aggregate
from raypfl.config.specs import NODE_AGGREGATION as MODES


def node_groups(nodes: Sequence[str | None], server_node: str | None, mode: str) -> list[list[int]]:
    """Which shares are pushed together: one list of share indices per push, ordered by first member.

    `nodes[i]` is the node of share i's actor (None: not known, never grouped); `server_node` is the
    parameter server's node. A group of one is a share pushed on its own.
    """
    if mode not in MODES:
        raise ValueError(f"runtime.node_aggregation={mode} must be one of {', '.join(MODES)}")
    by_node: dict[str, list[int]] = {}
    groups: list[list[int]] = []
    for index, node in enumerate(nodes):
        if node is None or mode == "never" or (mode == "auto" and node == server_node):
            groups.append([index])
        else:
            by_node.setdefault(node, []).append(index)
    for members in by_node.values():
        groups.extend([members] if len(members) >= 2 else [[i] for i in members])
    return sorted(groups, key=lambda group: group[0])


def sum_partials(*partials: Aggregate) -> Aggregate:
    """The partials merged in the order given (what the server would do with them, one push instead)."""
    total = Aggregate()
    for partial in partials:
        total.merge(partial)
    return total
