"""The floor: W as a plain single-process PyTorch loop (1 thread), no framework at all.

    python benchmarks/impl_floor.py --model mlp --rounds 12 --out /tmp/floor.json

The same data, partition, initial weights, cohorts and per-client shuffles as every other implementation
(see workload.py), so its accuracy is the reference the others must agree with.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
import workload

from raypfl.models.weights import get_flat, set_flat
from raypfl.models.zoo import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    workload.add_arguments(parser)
    args = parser.parse_args()
    w = workload.from_args(args)
    torch.set_num_threads(1)
    clock = workload.RoundClock("floor", w, args.out)
    data, partition, weights = workload.load(w)
    x, y = torch.from_numpy(data.train_x), torch.from_numpy(data.train_y)
    test_x, test_y = torch.from_numpy(data.test_x), torch.from_numpy(data.test_y)
    model = build_model(w.model, data.in_shape, data.num_classes)
    for round_idx in range(1, w.rounds + 1):
        total, weight = np.zeros_like(weights, dtype=np.float64), 0.0
        for client in workload.cohort(w, round_idx):
            idx = torch.from_numpy(np.array(partition.indices(client)))
            set_flat(model, weights)
            optimizer = torch.optim.SGD(model.parameters(), lr=w.lr)
            generator = torch.Generator().manual_seed(workload.shuffle_seed(w, round_idx, client))
            model.train()
            for _ in range(w.local_epochs):
                order = idx[torch.randperm(len(idx), generator=generator)]
                for start in range(0, len(order), w.batch_size):
                    batch = order[start : start + w.batch_size]
                    optimizer.zero_grad(set_to_none=True)
                    F.cross_entropy(model(x[batch]), y[batch]).backward()
                    optimizer.step()
            total += (get_flat(model) - weights).astype(np.float64) * len(idx)
            weight += len(idx)
        weights = (weights.astype(np.float64) + total / weight).astype(np.float32)
        set_flat(model, weights)
        model.eval()
        with torch.no_grad():
            correct = sum(
                int((model(test_x[s : s + 256]).argmax(1) == test_y[s : s + 256]).sum())
                for s in range(0, len(test_y), 256)
            )
        clock.round_done(round_idx, correct / len(test_y))
    clock.write()


if __name__ == "__main__":
    main()
