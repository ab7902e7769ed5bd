"""Lock-step CNN step on the CPU: the alternatives to vmap's grouped convolution, against the plain loop.

    python benchmarks/lockstep_conv.py --model cnn --clients 5 10 --repeats 15

One training step (forward, backward, plain SGD) of n clients x B=10 MNIST-shaped images, per alternative:

- plain: the floor, n single-client steps one after another (model, autograd, torch.optim.SGD);
- plain-cl: the same with the model and inputs in channels_last;
- vmap: raypfl's general lock-step path (functional_call + vmap: a grouped conv), one autograd backward;
- blockdiag: clients stacked along the batch axis, every conv run with all n clients' filters concatenated
  (out_channels = n*O) and each client's diagonal block kept, autograd backward (n x the conv FLOPs);
- im2col: raypfl/training/stacked_conv.py in mode "im2col": per-client im2col + baddbmm (activations
  [n, C, B, H, W]), hand-written backward (input gradient: bmm + col2im), the SGD update folded into the
  weight-gradient product;
- conv-loop: the same hand-written step in mode "loop": each client's conv layers run one client at a
  time (oneDNN convolution and `convolution_backward`, max-pool with indices, SGD update), the Linear
  layers batched over clients with the update fused into the gradient product (the first Linear in
  L2-sized column tiles), max-pool before ReLU;
- conv-loop-cl: mode "loop-cl", raypfl's choice: the same in channels_last, and the first conv as one
  im2col GEMM over all clients with its update folded into the weight-gradient GEMM (a per-layer choice).

Then (`--epoch-repeats`) a whole local epoch of n clients of 600 images through raypfl's own functions:
`train_local` one client after another (the floor's loop) against `train_lockstep`.

Timings are interleaved (every alternative once per repeat, in turn) on 1 torch thread, medians reported,
and the ratio is to `plain` of the same n. Both the thread's CPU time (robust when the machine is shared:
time spent descheduled does not count) and wall time are given.
Writes benchmarks/results/lockstep_conv.{md,csv}.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from raypfl.config import OptimSpec, TrainSpec
from raypfl.models.zoo import build_model
from raypfl.training.local import make_optimizer, train_local
from raypfl.training.lockstep import ClientJob, train_lockstep
from raypfl.training.stacked_conv import Layer, conv_stack, stacked_step

RESULTS = Path(__file__).resolve().parent / "results"


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _blockdiag_forward(
    layers: list[Layer], params: dict[str, torch.Tensor], xb: torch.Tensor
) -> torch.Tensor:
    """Every conv over all clients' batches with all clients' filters; keep each client's own block."""
    n, b = xb.shape[:2]
    h = xb.reshape(n * b, *xb.shape[2:])
    for layer in layers:
        if layer.kind == "conv":
            w = params[layer.weight]
            bias = params[layer.bias].reshape(-1) if layer.bias else None
            out = F.conv2d(h, w.reshape(-1, *w.shape[2:]), bias, layer.stride, layer.padding)
            out = out.view(n, b, n, w.shape[1], *out.shape[-2:]).diagonal(dim1=0, dim2=2)
            h = out.permute(4, 0, 1, 2, 3).reshape(n * b, w.shape[1], *out.shape[-3:-1])
        elif layer.kind == "relu":
            h = torch.relu(h)
        elif layer.kind == "pool":
            h = F.max_pool2d(h, layer.kernel, layer.stride)
        elif layer.kind == "flatten":
            h = h.reshape(n, b, -1)
        else:
            w = params[layer.weight]
            bias = params[layer.bias].unsqueeze(1) if layer.bias else torch.zeros(())
            h = torch.baddbmm(bias, h, w.transpose(1, 2))
    return h


def _alternatives(model_name: str, n: int, batch: int) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    model = build_model(model_name)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    x = torch.randn(n, batch, 1, 28, 28)
    y = torch.randint(0, 10, (n, batch))
    lr = 0.05
    layers = conv_stack(model)
    assert layers is not None
    stacked = {k: v.unsqueeze(0).repeat(n, *[1] * v.dim()).contiguous() for k, v in start.items()}
    names = list(stacked)
    mask, counts = torch.ones(n, batch), torch.full((n,), float(batch))

    models = [build_model(model_name) for _ in range(n)]
    optims = [torch.optim.SGD(m.parameters(), lr=lr) for m in models]
    models_cl = [build_model(model_name).to(memory_format=torch.channels_last) for _ in range(n)]
    optims_cl = [torch.optim.SGD(m.parameters(), lr=lr) for m in models_cl]
    x_cl = [x[c].contiguous(memory_format=torch.channels_last) for c in range(n)]

    def plain() -> None:
        for c in range(n):
            optims[c].zero_grad(set_to_none=True)
            F.cross_entropy(models[c](x[c]), y[c]).backward()
            optims[c].step()

    def plain_cl() -> None:
        for c in range(n):
            optims_cl[c].zero_grad(set_to_none=True)
            F.cross_entropy(models_cl[c](x_cl[c]), y[c]).backward()
            optims_cl[c].step()

    forward = vmap(lambda p, xb: functional_call(model, p, (xb,)))

    def autograd_step(fwd: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]) -> None:
        leaves = [stacked[k].requires_grad_() for k in names]
        logits = fwd(dict(zip(names, leaves)), x)
        loss = F.cross_entropy(logits.reshape(n * batch, -1), y.reshape(-1), reduction="none")
        grads = torch.autograd.grad(loss.view(n, batch).mean(1).sum(), leaves)
        with torch.no_grad():
            for k, g in zip(names, grads):
                stacked[k].sub_(g, alpha=lr)

    def hand(mode: str) -> None:
        stacked_step(layers, {k: v.detach() for k, v in stacked.items()}, x, y, mask, counts, lr, mode)

    return {
        "plain": plain,
        "plain-cl": plain_cl,
        "vmap": lambda: autograd_step(forward),
        "blockdiag": lambda: autograd_step(lambda p, xb: _blockdiag_forward(layers, p, xb)),
        "im2col": lambda: hand("im2col"),
        "conv-loop": lambda: hand("loop"),
        "conv-loop-cl": lambda: hand("loop-cl"),
    }


def _epochs(model_name: str, n: int, batch: int, samples: int) -> dict[str, Callable[[], None]]:
    """A whole local epoch of n clients of `samples` images: train_local one client after another (the
    floor's loop) against raypfl's train_lockstep (which takes the stacked-conv path for `cnn`)."""
    torch.manual_seed(0)
    model = build_model(model_name)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = torch.randn(n * samples, 1, 28, 28), torch.randint(0, 10, (n * samples,))
    spec, optim = TrainSpec(batch_size=batch, local_epochs=1), OptimSpec(lr=0.05)
    parts = [np.arange(c * samples, (c + 1) * samples) for c in range(n)]

    def plain() -> None:
        for c, part in enumerate(parts):
            alone = build_model(model_name)
            alone.load_state_dict(start)
            opt = make_optimizer(alone.parameters(), optim)
            train_local(alone, opt, x, y, part, spec, torch.Generator().manual_seed(c))

    def lockstep() -> None:
        jobs = [ClientJob(x, y, part, torch.Generator().manual_seed(c), spec) for c, part in enumerate(parts)]
        train_lockstep(model, start, jobs, optim)

    return {"plain": plain, "train_lockstep": lockstep}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--clients", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--skip", nargs="*", default=[], help="alternatives not to time")
    parser.add_argument("--epoch-repeats", type=int, default=3, help="whole local epochs (0: none)")
    parser.add_argument("--samples", type=int, default=600, help="images per client in an epoch")
    parser.add_argument("--out", default=str(RESULTS / "lockstep_conv"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    runs = [(n, "step", args.repeats) for n in args.clients]
    runs += [(n, "epoch", args.epoch_repeats) for n in args.clients if args.epoch_repeats]
    for n, unit, repeats in runs:
        alts = (
            {k: f for k, f in _alternatives(args.model, n, args.batch).items() if k not in args.skip}
            if unit == "step"
            else _epochs(args.model, n, args.batch, args.samples)
        )
        times: dict[str, list[float]] = {k: [] for k in alts}
        cpu: dict[str, list[float]] = {k: [] for k in alts}
        for f in alts.values() if unit == "step" else ():  # warm-up
            f()
        for _ in range(repeats):
            for name, f in alts.items():
                t0, c0 = time.perf_counter(), time.thread_time()
                f()
                cpu[name].append(time.thread_time() - c0)
                times[name].append(time.perf_counter() - t0)
        floor, floor_cpu = statistics.median(times["plain"]), statistics.median(cpu["plain"])
        for name, ts in times.items():
            med, med_cpu = statistics.median(ts), statistics.median(cpu[name])
            rows.append(
                {
                    "model": args.model,
                    "clients": n,
                    "batch": args.batch,
                    "unit": unit,
                    "alternative": name,
                    "cpu_ms": round(1e3 * med_cpu, 2),
                    "cpu_ratio": round(med_cpu / floor_cpu, 3),
                    "wall_ms": round(1e3 * med, 2),
                    "wall_min_ms": round(1e3 * min(ts), 2),
                    "wall_ratio": round(med / floor, 3),
                }
            )
            print(
                f"{unit:5s} n={n:3d} {name:14s} cpu {1e3 * med_cpu:8.2f} ms x{med_cpu / floor_cpu:.3f}"
                f"  wall {1e3 * med:8.2f} ms (min {1e3 * min(ts):8.2f}) x{med / floor:.3f}"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"CPU: {_cpu()}, torch {torch.__version__}, 1 thread, {args.repeats} interleaved repeats, "
        f"model {args.model}, B={args.batch}",
        "",
        "| unit | clients | alternative | CPU ms | / plain | wall ms | min | / plain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['unit']} | {r['clients']} | {r['alternative']} | {r['cpu_ms']} | {r['cpu_ratio']} "
        f"| {r['wall_ms']} | {r['wall_min_ms']} | {r['wall_ratio']} |"
        for r in rows
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
