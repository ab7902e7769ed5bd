"""Decentralized training without a server: `paradigm=gossip`.

`gossip.nodes` nodes, each with its own model, optimizer and data shard, live in `distributed.workers`
host actors. A gossip round: every node takes `gossip.local_steps` local SGD steps, then (variant `mixing`)
replaces its model by the average of its neighbourhood, x_i <- sum_j W_ij x_j, with W the topology's
doubly-stochastic Metropolis matrix. Hosts fetch the neighbours' models straight from each other (ObjectRefs
passed through, never gathered by a server); the driver only keeps the schedule and the measurements.

Variant `pairwise` is the seed notebook's "running average": one running model g; each round every node
trains from g, then g <- (g + x_i) / 2 for the nodes in turn, which weights node i by 2^-(N - i + 1) (the
last node counts most): a biased average, kept for comparison.

Logged per round: the accuracy of the averaged model (mean of the nodes; g for pairwise), each node's
accuracy (first `gossip.node_test_limit` test images) and the consensus distance, the RMS distance of the
nodes' models from their mean.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import numpy as np
import ray
import torch

from raypfl.paradigms.base import ParadigmContext, Point
from raypfl.paradigms.topology import mixing_matrix, neighbours, spectral_gap
from raypfl.paradigms.worker import Evaluator, ShardTrainer


def consensus_distance(models: list[np.ndarray]) -> float:
    """RMS distance of the models from their mean: 0 when every node holds the same model."""
    stack = np.stack(models)
    return float(np.sqrt(np.mean(np.sum((stack - stack.mean(0)) ** 2, axis=1))))


def pairwise_average(start: np.ndarray, models: list[np.ndarray]) -> np.ndarray:
    """The running average: g <- (g + x_i) / 2 for each model in turn."""
    g = np.asarray(start, np.float32).copy()
    for x in models:
        g = (g + x) / 2
    return g


@ray.remote(num_cpus=1)
class GossipHost:
    """Some of the nodes: each a ShardTrainer (model, optimizer, shard, batch stream)."""

    def __init__(self, ctx: ParadigmContext, dataset, nodes: list[int], host: int):
        torch.set_num_threads(ctx.torch_threads)
        self.nodes = nodes
        self.trainers = [ShardTrainer.for_shard(ctx, dataset, i, ctx.delay(host)) for i in nodes]
        self.evaluator = Evaluator(dataset, ctx.model_name, ctx.gossip.node_test_limit)

    def ready(self) -> bool:
        return True

    def train(self, steps: int, start: np.ndarray | None, evaluate: bool) -> tuple:
        """Local steps on every node (from `start` if given); returns each node's model, then metrics."""
        t0 = time.perf_counter()
        losses, samples = [], 0
        for trainer in self.trainers:
            if start is not None:
                trainer.load(start)
            loss, n = trainer.local_steps(steps)
            losses.append(loss)
            samples += n
        models = [t.weights() for t in self.trainers]
        t1 = time.perf_counter()
        accs = [self.evaluator(m)[0] for m in models] if evaluate else []
        metrics = {
            "loss": float(np.mean(losses)),
            "samples": samples,
            "compute_s": t1 - t0,
            "eval_s": time.perf_counter() - t1,
            "node_acc": dict(zip(self.nodes, accs)),
        }
        return (*models, metrics)

    def mix(self, plan: list[list[tuple[int, float]]], evaluate: bool, *models: np.ndarray) -> tuple:
        """Node k's new model: sum of coefficient x models[index] over plan[k]; returns them, then metrics."""
        t0 = time.perf_counter()
        mixed = []
        for trainer, terms in zip(self.trainers, plan):
            new = np.zeros_like(models[0])
            for index, coefficient in terms:
                new += np.float32(coefficient) * models[index]
            trainer.load(new)
            mixed.append(new)
        t1 = time.perf_counter()
        accs = [self.evaluator(m)[0] for m in mixed] if evaluate else []
        metrics = {
            "apply_s": t1 - t0,
            "eval_s": time.perf_counter() - t1,
            "node_acc": dict(zip(self.nodes, accs)),
        }
        return (*mixed, metrics)


def _mix_plan(w: np.ndarray, nodes: list[int]) -> tuple[list[int], list[list[tuple[int, float]]]]:
    """The models a host needs (node ids) and, per own node, (position among them, weight) terms."""
    needed = sorted({j for i in nodes for j in np.flatnonzero(w[i])})
    position = {j: k for k, j in enumerate(needed)}
    plan = [[(position[j], float(w[i, j])) for j in np.flatnonzero(w[i])] for i in nodes]
    return needed, plan


def train(ctx: ParadigmContext) -> Iterator[Point]:
    """Gossip rounds until the budget of samples is spent; a point (and per-node rows) every round."""
    g, d = ctx.gossip, ctx.dist
    adj = neighbours(g.topology, g.nodes, g.degree, ctx.seed)
    w = mixing_matrix(adj)
    ctx.summary.update(
        {
            "topology": g.topology,
            "variant": g.variant,
            "nodes": g.nodes,
            "spectral_gap": spectral_gap(w),
            "degrees": sorted({len(a) for a in adj}),
        }
    )
    groups = [list(map(int, a)) for a in np.array_split(np.arange(g.nodes), d.workers)]
    shared = ctx.for_workers()
    hosts = [GossipHost.remote(shared, ctx.dataset_ref, nodes, h) for h, nodes in enumerate(groups)]
    node_rows = ctx.tables.setdefault("nodes", [])
    try:
        ray.get([h.ready.remote() for h in hosts])
        rounds = math.ceil(ctx.total_samples / (g.nodes * g.local_steps * d.batch_size))
        running = np.asarray(ctx.weights, np.float32)
        samples = 0
        for round_idx in range(1, rounds + 1):
            start = time.perf_counter()
            pairwise = g.variant == "pairwise"
            start_ref = ray.put(running) if pairwise else None
            trained = [
                h.train.options(num_returns=len(nodes) + 1).remote(g.local_steps, start_ref, pairwise)
                for h, nodes in zip(hosts, groups)
            ]
            train_metrics = ray.get([refs[-1] for refs in trained])
            model_refs = [ref for refs in trained for ref in refs[:-1]]  # in node order
            if pairwise:
                models = ray.get(model_refs)
                running = pairwise_average(running, models)
                mix_metrics = [{"apply_s": 0.0, "eval_s": 0.0, "node_acc": {}}] * len(hosts)
                point_model = running
            else:
                mixed = []
                for h, nodes in zip(hosts, groups):
                    needed, plan = _mix_plan(w, nodes)
                    mixed.append(
                        h.mix.options(num_returns=len(nodes) + 1).remote(
                            plan, True, *[model_refs[j] for j in needed]
                        )
                    )
                mix_metrics = ray.get([refs[-1] for refs in mixed])
                models = ray.get([ref for refs in mixed for ref in refs[:-1]])
                point_model = np.mean(np.stack(models), axis=0)
            wall = time.perf_counter() - start
            samples += sum(m["samples"] for m in train_metrics)
            node_acc = {k: v for m in (*train_metrics, *mix_metrics) for k, v in m["node_acc"].items()}
            for h, (tm, mm) in enumerate(zip(train_metrics, mix_metrics)):
                busy = tm["compute_s"] + mm["apply_s"] + tm["eval_s"] + mm["eval_s"]
                ctx.breakdown.append(
                    {
                        "iteration": round_idx - 1,
                        "worker": h,
                        "compute_s": tm["compute_s"],
                        "comm_s": max(0.0, wall - busy),
                        "apply_s": mm["apply_s"],
                    }
                )
            node_rows.extend(
                {"round": round_idx, "node": i, "test_acc": round(a, 6)} for i, a in sorted(node_acc.items())
            )
            accs = list(node_acc.values())
            extra = {
                "consensus": round(consensus_distance(models), 6),
                "node_acc_mean": round(float(np.mean(accs)), 6),
                "node_acc_min": round(float(np.min(accs)), 6),
                "node_acc_max": round(float(np.max(accs)), 6),
            }
            loss = float(np.mean([m["loss"] for m in train_metrics]))
            yield Point(samples, round_idx, time.time(), point_model, loss, extra)
    finally:
        for h in hosts:
            ray.kill(h)
