"""Vectorized clients: train a cohort's clients together in lock-step, one batched computation per step.

Every client keeps its own copy of the parameters, stacked along a leading client axis. At step s each
client takes its own s-th batch (the same batches, in the same order, as `training.batches` gives it on
the plain path); `torch.func.functional_call` + `vmap` run the model once over all clients' batches,
one backward pass gives every client its own gradient (a client's loss depends only on its own
parameters), and one SGD step updates them all. Clients with fewer batches, or a shorter last batch,
are handled by masking: padded samples do not count in the loss, and a client with no batch left at a
step is not updated (its parameters and momentum stay as they are), exactly as if it had stopped.

Supported: SGD (with momentum, weight decay; momentum buffers may come in and go out per client, for
`optim.persistent_state`), per-client gradient terms (FedProx's proximal term, SCAFFOLD's control-variate
correction), models without buffers (no BatchNorm running stats) and without randomness in training (no
dropout). The plain path remains the reference: in float64 both agree
to <= 1e-10 after one local epoch; in float32 they differ by summation order only (see
tests/training/test_vectorize.py for what that does and does not bound).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from raypfl.config import OptimSpec, TrainSpec
from raypfl.errors import ConfigError
from raypfl.training.local import TrainResult, batches, make_optimizer
from raypfl.training.stacked_conv import conv_stack, masked_cross_entropy, matches_model, stacked_step


@dataclass
class ClientJob:
    """One client's share of a lock-step cohort: its data view, indices, shuffling and local work."""

    x: torch.Tensor
    y: torch.Tensor
    indices: np.ndarray
    generator: torch.Generator
    train: TrainSpec


def check_vectorizable(model: nn.Module, optim: OptimSpec) -> None:
    """Raise ConfigError if `runtime.vectorize=true` cannot train this model with this optimizer."""
    if optim.name != "sgd":
        raise ConfigError(f"runtime.vectorize=true supports optim.name=sgd only (got {optim.name})")
    if any(True for _ in model.buffers()):
        raise ConfigError("runtime.vectorize=true needs a model without buffers (e.g. no BatchNorm)")
    if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
        raise ConfigError("runtime.vectorize=true needs a model without dropout")


def _schedule(jobs: list[ClientJob]) -> tuple[list[list[torch.Tensor]], int]:
    """Each client's batch list (drawn exactly as on the plain path) and the longest one's length."""
    plans = [list(batches(job.indices, job.train, job.generator)) for job in jobs]
    return plans, max((len(p) for p in plans), default=0)


def _source(jobs: list[ClientJob]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One (x, y) every job indexes into, and each job's offset in it (shared arrays: offsets 0)."""
    first = jobs[0]
    if all(job.x is first.x and job.y is first.y for job in jobs):
        return first.x, first.y, [0] * len(jobs)
    offsets = np.cumsum([0] + [len(job.y) for job in jobs[:-1]]).tolist()
    return torch.cat([job.x for job in jobs]), torch.cat([job.y for job in jobs]), offsets


def train_lockstep(
    model: nn.Module,
    global_weights: dict[str, torch.Tensor],
    jobs: list[ClientJob],
    optim: OptimSpec,
    proximal_mu: float = 0.0,
    correction: dict[str, torch.Tensor] | None = None,
    momentum: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], list[TrainResult]]:
    """Train every job's client from `global_weights` (name -> tensor); return stacked final parameters
    (name -> tensor with a leading client axis) and each client's TrainResult.

    `proximal_mu` > 0 adds FedProx's `mu * (w - w_global)` to every gradient (as the plain path's
    `adjust` does), before weight decay. `correction` (name -> stacked tensor) is added to every client's
    gradient at each of its steps, also before weight decay (SCAFFOLD's `c - c_i`). `momentum` (name ->
    stacked tensor) holds the clients' momentum buffers on entry (zeros: a fresh optimizer, which
    torch's first step `buf = g` equals exactly) and is updated in place (`optim.persistent_state`)."""
    n = len(jobs)
    plans, steps = _schedule(jobs)
    x, y, offsets = _source(jobs)
    width = max((len(b) for plan in plans for b in plan), default=1)
    params = {k: v.detach().unsqueeze(0).repeat(n, *([1] * v.dim())) for k, v in global_weights.items()}
    if optim.momentum and momentum is None:
        momentum = {k: torch.zeros_like(v) for k, v in params.items()}
    momentum = momentum if optim.momentum else None
    names = list(params)
    device, dtype = next(iter(params.values())).device, next(iter(params.values())).dtype
    plain_sgd = not optim.momentum and not optim.weight_decay and not proximal_mu
    stack = linear_stack(model) if plain_sgd else None
    convs = conv_stack(model) if plain_sgd and stack is None else None
    anchor = {k: v.detach() for k, v in global_weights.items()} if proximal_mu else None
    forward = vmap(lambda p, xb: functional_call(model, p, (xb,)))

    loss_sum = torch.zeros(n, dtype=torch.float64)
    correct = torch.zeros(n, dtype=torch.int64)
    seen = torch.zeros(n, dtype=torch.int64)
    taken = torch.zeros(n, dtype=torch.int64)
    for step in range(steps):
        index = torch.zeros(n, width, dtype=torch.int64)
        mask = torch.zeros(n, width, dtype=dtype)  # the loss scale 1/B in the model's precision
        for c, plan in enumerate(plans):
            if step < len(plan):
                batch = plan[step]
                index[c, : len(batch)] = batch + offsets[c]
                mask[c, : len(batch)] = 1.0
        counts = mask.sum(1)
        active = counts > 0
        full = bool(active.all()) and bool((counts == width).all())
        xb, targets = x[index].to(device), y[index].to(device)  # no-ops on the CPU
        mask, counts, active = mask.to(device), counts.to(device), active.to(device)
        if convs is not None and step == 0 and not matches_model(convs, model, params, xb):
            convs = None  # its forward is not its modules in order: the general path
        if stack is not None or convs is not None:  # hand-written plain-SGD steps
            if stack is not None:
                logits, per_client = _fused_linear_step(stack, params, xb, targets, mask, counts, optim.lr)
            else:
                logits, per_client = stacked_step(convs, params, xb, targets, mask, counts, optim.lr)
            if correction is not None:
                _correct(params, correction, active, full, optim.lr)
        else:
            leaves = [params[k].requires_grad_() for k in names]
            logits = forward(dict(zip(names, leaves)), xb)
            losses = F.cross_entropy(logits.reshape(n * width, -1), targets.reshape(-1), reduction="none")
            losses = losses.view(n, width)
            per_client = losses.mean(1) if full else (losses * mask).sum(1) / counts.clamp(min=1)
            grads = torch.autograd.grad(per_client.sum(), leaves)
            with torch.no_grad():
                grads = dict(zip(names, grads))
                if anchor is not None:
                    grads = {k: g.add(params[k] - anchor[k], alpha=proximal_mu) for k, g in grads.items()}
                if correction is not None:
                    grads = {k: g.add(correction[k]) for k, g in grads.items()}
                _sgd_step(params, momentum, grads, active, full, optim)
        with torch.no_grad():
            hits = (logits.argmax(-1) == targets).float() * mask
            loss_sum += (per_client.detach() * counts).double().cpu()
            correct += hits.sum(1).long().cpu()
            seen += counts.long().cpu()
            taken += active.long().cpu()
    results = [
        TrainResult(
            float(loss_sum[c]) / max(int(seen[c]), 1),
            int(correct[c]) / max(int(seen[c]), 1),
            int(taken[c]),
            int(seen[c]),
        )
        for c in range(n)
    ]
    return {k: v.detach() for k, v in params.items()}, results


def linear_stack(model: nn.Module) -> list[tuple[str, str | None, bool]] | None:
    """[(weight name, bias name, ReLU after?)] if the model is a plain Flatten/Linear/ReLU stack, else None.

    Such models (the `mlp` family) take the fused path: hand-written batched forward and backward whose
    SGD update is folded into the gradient product (`W.baddbmm_(dz^T, h, alpha=-lr)`), so no gradient
    tensor is written and read back: the stacked weights of many clients no longer fit in cache, and
    memory traffic, not arithmetic, is what a lock-step step costs.
    """
    prefix, seq = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Sequential)), ("", None))
    if seq is None or sum(p.numel() for p in seq.parameters()) != sum(p.numel() for p in model.parameters()):
        return None
    if type(model).forward not in (nn.Sequential.forward,) and getattr(model, "net", None) is not seq:
        return None
    layers: list[tuple[str, str | None, bool]] = []
    for name, module in seq.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(module, nn.Linear):
            layers.append((f"{full}.weight", f"{full}.bias" if module.bias is not None else None, False))
        elif isinstance(module, nn.ReLU) and layers and not layers[-1][2]:
            layers[-1] = (*layers[-1][:2], True)
        elif not (isinstance(module, nn.Flatten) and not layers):
            return None
    return layers if layers and not layers[-1][2] else None


def _fused_linear_step(
    layers: list[tuple[str, str | None, bool]],
    params: dict[str, torch.Tensor],
    xb: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    counts: torch.Tensor,
    lr: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One plain-SGD step of every client's Linear/ReLU stack; returns (logits, per-client mean loss)."""
    with torch.no_grad():
        h = xb.reshape(xb.shape[0], xb.shape[1], -1)
        inputs, pre = [], []
        for weight, bias, relu in layers:
            inputs.append(h)
            w = params[weight]
            z = (
                torch.bmm(h, w.transpose(1, 2))
                if bias is None
                else torch.baddbmm(params[bias].unsqueeze(1), h, w.transpose(1, 2))
            )
            pre.append(z)
            h = torch.relu(z) if relu else z
        logits = h
        per_client, dz = masked_cross_entropy(logits, targets, mask, counts)
        for i in range(len(layers) - 1, -1, -1):
            weight, bias, _ = layers[i]
            w = params[weight]
            dh = torch.bmm(dz, w) if i > 0 else None  # needs the weights before their update
            w.baddbmm_(dz.transpose(1, 2), inputs[i], alpha=-lr)
            if bias is not None:
                params[bias].sub_(dz.sum(1), alpha=lr)
            if i > 0:
                dz = dh.mul_(pre[i - 1] > 0) if layers[i - 1][2] else dh
    return logits, per_client


def _correct(
    params: dict[str, torch.Tensor],
    correction: dict[str, torch.Tensor],
    active: torch.Tensor,
    full: bool,
    lr: float,
) -> None:
    """The fused path's share of a corrected gradient: `p -= lr * correction` for the active clients."""
    for k, p in params.items():
        c = correction[k] if full else correction[k] * active.view((-1,) + (1,) * (p.dim() - 1)).to(p.dtype)
        p.sub_(c, alpha=lr)


def _sgd_step(
    params: dict[str, torch.Tensor],
    momentum: dict[str, torch.Tensor] | None,
    grads: dict[str, torch.Tensor],
    active: torch.Tensor,
    full: bool,
    optim: OptimSpec,
) -> None:
    """torch.optim.SGD's update (weight decay, momentum without dampening) for the active clients only.

    A zero buffer gives `0 * momentum + g == g` exactly: torch's first step (`buf = g`) needs no case."""
    for k, p in params.items():
        g = grads[k]
        if optim.weight_decay:
            g = g.add(p, alpha=optim.weight_decay)
        if momentum is not None:
            buf = momentum[k]
            new = buf * optim.momentum + g
            if full:
                buf.copy_(new)
            else:
                shape = (-1,) + (1,) * (p.dim() - 1)
                buf.copy_(torch.where(active.view(shape), new, buf))
            g = buf
        if full:
            p.sub_(g, alpha=optim.lr)
        else:
            p.sub_(g * active.view((-1,) + (1,) * (p.dim() - 1)).to(g.dtype), alpha=optim.lr)


def stack_optimizer_states(
    model: nn.Module, optim: OptimSpec, states: list[dict | None]
) -> dict[str, torch.Tensor] | None:
    """The clients' SGD momentum buffers (their optimizer `state_dict`s, None: never trained) stacked by
    parameter name; zeros where a client has none. None if `optim.momentum` is 0 (SGD keeps no buffer)."""
    if not optim.momentum:
        return None
    names = [name for name, _ in model.named_parameters()]
    stacked = {
        name: torch.zeros((len(states), *p.shape), dtype=p.dtype) for name, p in model.named_parameters()
    }
    for c, state in enumerate(states):
        if state is None:
            continue
        optimizer = make_optimizer(model.parameters(), optim)
        optimizer.load_state_dict(state)
        for name, p in zip(names, model.parameters()):
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                stacked[name][c].copy_(buf)
    device = next(model.parameters()).device
    return {name: t.to(device) for name, t in stacked.items()}


def optimizer_states(
    model: nn.Module, optim: OptimSpec, momentum: dict[str, torch.Tensor] | None, n: int
) -> list[dict]:
    """Each client's optimizer `state_dict` (CPU tensors) after lock-step training: what the plain path's
    `torch.optim.SGD` would hold, so a state written by either path loads in the other."""
    states = []
    for c in range(n):
        optimizer = make_optimizer(model.parameters(), optim)
        if momentum is not None:
            for name, p in model.named_parameters():
                optimizer.state[p]["momentum_buffer"] = momentum[name][c].detach().cpu().clone()
        states.append(optimizer.state_dict())
    return states
