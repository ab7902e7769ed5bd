"""A dataset of your own, with natural clients: handwritten digits grouped by writer.

    python -m raypfl dataset._target_=examples.writers.load partition=natural clients.num=6 \
        clients.per_round=3 model=mlp

A stand-in for FEMNIST-style data that runs offline in seconds: it is derived from the MNIST files raypfl
reads anyway (`dataset.root`, passed because the signature names `root`). Each of `writers` writers gets
`per_writer` training images drawn with a label mix of their own (Dirichlet(`alpha`) over the 10 digits)
and a handwriting "style" of their own (every image of theirs shifted by the same (dy, dx), up to 2
pixels). The test set is the first `test_size` MNIST test images, as they are. Samples are shuffled
together, so the writers' samples are interleaved, as in a real export; `partition=natural` gives writer
k's samples to client k (writers in sorted order of their ids, "writer_00", "writer_01", ...).

Everything comes from `seed`: the same arguments give the same data.
"""

from __future__ import annotations

import numpy as np

from raypfl.data.datasets import load_dataset

CLASSES = 10


def load(
    root: str | None = None,
    writers: int = 6,
    per_writer: int = 100,
    test_size: int = 500,
    alpha: float = 1.0,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """train_x, train_y, test_x, test_y (normalised MNIST arrays) and client_ids (one writer per sample)."""
    pool = max(2000, 2 * writers * per_writer)  # the first MNIST training images the writers draw from
    mnist = load_dataset("mnist", root, download=False, train_limit=pool, test_limit=test_size)
    rng = np.random.default_rng(seed)
    by_class = [list(rng.permutation(np.flatnonzero(mnist.train_y == c))) for c in range(CLASSES)]
    xs, ys, ids = [], [], []
    for writer in range(writers):
        counts = rng.multinomial(per_writer, rng.dirichlet(np.full(CLASSES, alpha)))
        shift = rng.integers(-2, 3, size=2)  # this writer's style
        for digit, count in enumerate(counts):
            take = [by_class[digit].pop() for _ in range(min(count, len(by_class[digit])))]
            if not take:
                continue
            images = np.roll(mnist.train_x[take], shift=tuple(shift), axis=(2, 3))
            xs.append(images)
            ys.append(np.full(len(take), digit, dtype=np.int64))
            ids += [f"writer_{writer:02d}"] * len(take)
    order = rng.permutation(len(ids))
    return {
        "train_x": np.concatenate(xs)[order],
        "train_y": np.concatenate(ys)[order],
        "test_x": mnist.test_x,
        "test_y": mnist.test_y,
        "client_ids": np.array(ids)[order],
    }
