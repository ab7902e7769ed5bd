"""Where the Ray runtime's actors go (`runtime.placement`) and a record of where they landed.

`pack` leaves scheduling to Ray's default policy (fill the driver's node, then others); `spread` asks for
Ray's SPREAD strategy: actors go round-robin over the nodes that have room for them. SPREAD is best effort
(more actors than nodes still works, a full node is skipped, restarted actors are placed the same way)
and needs no placement group to create or free, which is why it is used instead of a STRICT_SPREAD
placement group (that fails outright when there are more actors than nodes).

Ray is imported lazily: `raypfl.config` imports `PLACEMENTS` from here to validate the key.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

PLACEMENTS = ("pack", "spread")

#: Resources every node has; anything else a node declares is a custom resource that labels it.
_STANDARD = ("CPU", "GPU", "memory", "object_store_memory")


def scheduling_options(placement: str) -> dict[str, Any]:
    """`.options(...)` for a client actor under `runtime.placement=placement`."""
    if placement not in PLACEMENTS:
        raise ValueError(f"runtime.placement={placement} must be one of {', '.join(PLACEMENTS)}")
    return {"scheduling_strategy": "SPREAD"} if placement == "spread" else {}


def actor_location(_instance: object = None) -> dict[str, Any]:
    """Where the calling Ray worker runs: node id, node IP, pid and the GPU ids Ray assigned to it.

    Called inside an actor (a method, or `actor.__ray_call__.remote(actor_location)`).
    """
    import ray

    context = ray.get_runtime_context()
    return {
        "node_id": context.get_node_id(),
        "ip": ray.util.get_node_ip_address(),
        "pid": os.getpid(),
        "gpu_ids": [str(g) for g in context.get_accelerator_ids().get("GPU", [])],
    }


def node_labels() -> dict[str, str]:
    """node id -> a short label: the node's custom resources (e.g. `worker_a`), `head` for the head."""
    import ray

    labels = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        names = [
            name
            for name in node.get("Resources", {})
            if name not in _STANDARD and not name.startswith(("node:", "accelerator_type:"))
        ]
        if "node:__internal_head__" in node.get("Resources", {}):
            names.insert(0, "head")
        labels[node["NodeID"]] = ",".join(names)
    return labels


def by_node(placement: Sequence[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The placement rows grouped by node id, nodes in order of their first actor."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in placement:
        groups.setdefault(row["node_id"], []).append(row)
    return list(groups.items())


def describe(placement: Sequence[dict[str, Any]]) -> list[str]:
    """One line per node: `node 3f2a9c1b2d4e (10.0.0.2, worker_a): actors 0, 2 (pids 811, 812)`."""
    lines = []
    for node_id, rows in by_node(placement):
        where = ", ".join(x for x in (rows[0]["ip"], rows[0].get("label", "")) if x)
        gpus = sorted({g for r in rows for g in r.get("gpu_ids", [])})
        lines.append(
            f"node {node_id[:12]} ({where}): actors {', '.join(str(r['actor']) for r in rows)} "
            f"(pids {', '.join(str(r['pid']) for r in rows)})" + (f", GPUs {', '.join(gpus)}" if gpus else "")
        )
    return lines


def markdown_table(placement: Sequence[dict[str, Any]]) -> str:
    """The placement as a Markdown table: one row per actor."""
    lines = [
        "| actor | node id | node | IP | pid | GPU ids | CUDA_VISIBLE_DEVICES | model on |",
        "|---:|---|---|---|---:|---|---|---|",
    ]
    for r in placement:
        cells = (r["actor"], r["node_id"][:12], r.get("label") or "-", r["ip"], r["pid"])
        gpus = ", ".join(r.get("gpu_ids", [])) or "-"
        visible = r.get("cuda_visible")
        extra = (gpus, "unset" if visible is None else f"`{visible}`", r.get("device", "?"))
        lines.append("| " + " | ".join(str(c) for c in (*cells, *extra)) + " |")
    return "\n".join(lines)
