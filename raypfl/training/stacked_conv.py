"""Lock-step CNNs on the CPU without grouped convolutions: a hand-written plain-SGD step for conv stacks.

Under `vmap` a per-client convolution becomes one grouped convolution, whose CPU kernels (forward and,
above all, weight gradient) are slow. `stacked_step` instead runs a Conv/ReLU/MaxPool/Flatten/Linear stack
by hand, forward and backward, with no autograd:

- the conv layers (mode "loop-cl", the default) one client at a time with the ordinary oneDNN kernels
  (`conv2d`, `convolution_backward`, `max_pool2d`) on channels-last activations, the layout in which
  oneDNN's convolution and PyTorch's max-pool are fastest on these small images, except the first conv:
  one im2col GEMM over all clients (it needs no input gradient, and oneDNN's weight gradient for 1 input
  channel is slow) with the SGD update folded into its weight-gradient GEMM; max-pool runs before the
  ReLU (same values and gradients, 4x fewer elements). Mode "loop" is the per-client path in NCHW, mode
  "im2col" batches every conv over clients as im2col + `baddbmm` (activations `[n, C, B, H, W]`, input
  gradient by `bmm` + col2im); both are slower and kept for benchmarks/lockstep_conv.py;
- the Linear layers batched over clients, the SGD update folded into the gradient product, as on
  lockstep.py's fused Linear path; the first Linear of a CNN holds most of its weights (6 MB a client),
  so its input gradient and update walk it in L2-sized tiles and read it from memory once.

`conv_stack` says whether a model can take this path: its leaf modules, in order, are Conv2d (no groups,
no dilation, zero padding), ReLU, MaxPool2d, then Flatten and Linear/ReLU, ending with a Linear;
`matches_model` checks that the model's own forward pass is that sequence (once per call, first batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Layer", "conv_stack", "matches_model", "stacked_step"]


@dataclass(frozen=True)
class Layer:
    """One step of the stack: kind in conv, linear, relu, pool, flatten; conv/pool geometry (square)."""

    kind: str
    weight: str | None = None
    bias: str | None = None
    kernel: int = 0
    stride: int = 1
    padding: int = 0


def _square(value: int | tuple[int, ...]) -> int | None:
    """An int, or a tuple of equal ints as one int; None for an anisotropic setting."""
    if isinstance(value, int):
        return value
    return value[0] if len(set(value)) == 1 else None


def conv_stack(model: nn.Module) -> list[Layer] | None:
    """The model's leaf modules as a Layer list if all are supported and it has a conv, else None."""
    layers: list[Layer] = []
    for name, module in model.named_modules():
        if any(True for _ in module.children()):
            continue
        if isinstance(module, nn.Conv2d):
            k, s, p = _square(module.kernel_size), _square(module.stride), _square(module.padding)
            if (
                module.groups != 1
                or _square(module.dilation) != 1
                or module.padding_mode != "zeros"
                or None in (k, s, p)
                or not isinstance(module.padding, tuple | int)
            ):
                return None
            bias = f"{name}.bias" if module.bias is not None else None
            layers.append(Layer("conv", f"{name}.weight", bias, k, s, p))  # type: ignore[arg-type]
        elif isinstance(module, nn.Linear):
            bias = f"{name}.bias" if module.bias is not None else None
            layers.append(Layer("linear", f"{name}.weight", bias))
        elif isinstance(module, nn.ReLU):
            layers.append(Layer("relu"))
        elif isinstance(module, nn.MaxPool2d):
            k, s, p = _square(module.kernel_size), _square(module.stride), _square(module.padding)
            if module.ceil_mode or _square(module.dilation) != 1 or None in (k, s) or p != 0:
                return None
            layers.append(Layer("pool", kernel=k, stride=s))  # type: ignore[arg-type]
        elif isinstance(module, nn.Flatten):
            if module.start_dim != 1 or module.end_dim != -1:
                return None
            layers.append(Layer("flatten"))
        else:
            return None
    kinds = [layer.kind for layer in layers]
    if "conv" not in kinds or kinds[-1] != "linear" or "flatten" not in kinds:
        return None
    first_linear = kinds.index("linear")
    if any(k in ("conv", "pool") for k in kinds[first_linear:]) or kinds[first_linear - 1] != "flatten":
        return None
    if any(k in ("conv", "pool") for k in kinds[kinds.index("flatten") :]):
        return None
    return layers


def matches_model(
    layers: list[Layer], model: nn.Module, params: dict[str, torch.Tensor], xb: torch.Tensor
) -> bool:
    """True if `layers` on client 0's batch give the model's own output (its forward is the stack)."""
    with torch.no_grad():
        mine = _logits(layers, {k: v[:1] for k, v in params.items()}, xb[:1])[0]
        theirs = torch.func.functional_call(model, {k: v[0] for k, v in params.items()}, (xb[0],))
    return mine.shape == theirs.shape and torch.allclose(mine, theirs, rtol=1e-4, atol=1e-5)


def _im2col(h: torch.Tensor, k: int, s: int, p: int) -> tuple[torch.Tensor, int, int]:
    """Columns `[n, C*k*k, B*H'*W']` of activations `[n, C, B, H, W]` (one strided copy), and H', W'."""
    if p:
        h = F.pad(h, (p, p, p, p))
    n, c, b, hp, wp = h.shape
    ho, wo = (hp - k) // s + 1, (wp - k) // s + 1
    sn, sc, sb, sh, sw = h.stride()
    windows = h.as_strided((n, c, k, k, b, ho, wo), (sn, sc, sh, sw, sb, sh * s, sw * s))
    return windows.reshape(n, c * k * k, b * ho * wo), ho, wo


def _col2im(cols: torch.Tensor, shape: torch.Size, k: int, s: int, p: int, ho: int, wo: int) -> torch.Tensor:
    """The adjoint of `_im2col`: scatter-add columns back to activations of `shape` `[n, C, B, H, W]`."""
    n, c, b, h, w = shape
    padded = cols.new_zeros(n, c, b, h + 2 * p, w + 2 * p)
    blocks = cols.view(n, c, k, k, b, ho, wo)
    for i in range(k):
        for j in range(k):
            padded[:, :, :, i : i + s * (ho - 1) + 1 : s, j : j + s * (wo - 1) + 1 : s] += blocks[:, :, i, j]
    return padded[:, :, :, p : p + h, p : p + w] if p else padded


def _conv_layer_im2col(
    layer: Layer, params: dict[str, torch.Tensor], h: torch.Tensor
) -> tuple[torch.Tensor, tuple]:
    """One conv of every client on activations `[n, C, B, H, W]`: im2col, then one baddbmm over clients."""
    w = params[layer.weight]  # type: ignore[index]
    n = w.shape[0]
    cols, ho, wo = _im2col(h, layer.kernel, layer.stride, layer.padding)
    w2 = w.view(n, w.shape[1], -1)
    out = (
        torch.bmm(w2, cols)
        if layer.bias is None
        else torch.baddbmm(params[layer.bias].unsqueeze(-1), w2, cols)
    )
    return out.view(n, w.shape[1], h.shape[2], ho, wo), (cols, h.shape, ho, wo)


def _conv_back_im2col(
    layer: Layer, params: dict[str, torch.Tensor], grad: torch.Tensor, keep: tuple, lr: float, below: bool
) -> torch.Tensor | None:
    """SGD-update a conv's weights from its output gradient (fused); return the input gradient if `below`."""
    cols, shape, ho, wo = keep
    w = params[layer.weight]  # type: ignore[index]
    w2 = w.view(w.shape[0], w.shape[1], -1)
    dy = grad.reshape(w.shape[0], w.shape[1], -1)  # [n, O, B*H'*W']
    dcols = torch.bmm(w2.transpose(1, 2), dy) if below else None  # needs the weights before their update
    w2.baddbmm_(dy, cols.transpose(1, 2), alpha=-lr)
    if layer.bias is not None:
        params[layer.bias].sub_(dy.sum(2), alpha=lr)
    return None if dcols is None else _col2im(dcols, shape, layer.kernel, layer.stride, layer.padding, ho, wo)


def _features_im2col(
    layers: list[Layer], params: dict[str, torch.Tensor], xb: torch.Tensor
) -> tuple[torch.Tensor, list[tuple]]:
    """Conv/ReLU/pool layers of every client at once; the flattened features `[n, B, F]` and saved state."""
    n, b = xb.shape[:2]
    h = xb.transpose(1, 2).contiguous()  # [n, C, B, H, W]
    saved: list[tuple] = []
    for layer in layers:
        if layer.kind == "conv":
            h, keep = _conv_layer_im2col(layer, params, h)
        elif layer.kind == "relu":
            h = torch.relu(h)
            keep = (h,)
        else:
            flat = h.reshape(-1, *h.shape[-3:])
            out, idx = F.max_pool2d(flat, layer.kernel, layer.stride, return_indices=True)
            keep = (flat, idx, h.shape)
            h = out.view(*h.shape[:3], *out.shape[-2:])
        saved.append(keep)
    saved.append((h.shape,))
    return h.transpose(1, 2).reshape(n, b, -1), saved


def _features_back_im2col(
    layers: list[Layer], params: dict[str, torch.Tensor], grad: torch.Tensor, saved: list[tuple], lr: float
) -> None:
    (shape,) = saved[-1]
    g = grad.reshape(shape[0], shape[2], shape[1], *shape[3:]).transpose(1, 2)
    for i in range(len(layers) - 1, -1, -1):
        layer, keep = layers[i], saved[i]
        if layer.kind == "conv":
            g = _conv_back_im2col(layer, params, g, keep, lr, i > 0)  # type: ignore[assignment]
        elif layer.kind == "relu":
            g = g * (keep[0] > 0)
        else:
            flat, idx, pshape = keep
            g = _pool_back(g.reshape(-1, *g.shape[-3:]), flat, idx, layer).view(pshape)


def _pool_back(grad: torch.Tensor, inp: torch.Tensor, idx: torch.Tensor, layer: Layer) -> torch.Tensor:
    k, s = [layer.kernel] * 2, [layer.stride] * 2
    return torch.ops.aten.max_pool2d_with_indices_backward(grad, inp, k, s, [0, 0], [1, 1], False, idx)


def _first_conv(layer: Layer, params: dict[str, torch.Tensor], xb: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The first conv of every client as one batched GEMM: channels-last output `[n, B, H', W', O]` and the
    columns `[n, B*H'*W', C*k*k]`. It needs no input gradient, and oneDNN's weight gradient for a conv
    with few input channels (MNIST's 1) is slow, while this GEMM's is fast and can fold in the update."""
    k, s, p = layer.kernel, layer.stride, layer.padding
    w = params[layer.weight]  # type: ignore[index]
    n, b = xb.shape[:2]
    xp = F.pad(xb, (p, p, p, p)).contiguous()
    ho, wo = (xp.shape[-2] - k) // s + 1, (xp.shape[-1] - k) // s + 1
    sn, sb, sc, sh, sw = xp.stride()
    cols = xp.as_strided((n, b, ho, wo, xp.shape[2], k, k), (sn, sb, sh * s, sw * s, sc, sh, sw))
    cols = cols.reshape(n, b * ho * wo, -1)
    w2 = w.view(n, w.shape[1], -1).transpose(1, 2)
    out = (
        torch.bmm(cols, w2)
        if layer.bias is None
        else torch.baddbmm(params[layer.bias].unsqueeze(1), cols, w2)
    )
    return out.view(n, b, ho, wo, w.shape[1]), cols


def _features_loop(
    layers: list[Layer], params: dict[str, torch.Tensor], xb: torch.Tensor, channels_last: bool
) -> tuple[torch.Tensor, list[list[tuple]]]:
    """Conv/ReLU/pool layers one client at a time (ordinary oneDNN kernels, optionally channels-last); the
    flattened features `[n, B, F]` of all clients and each client's saved state (the last entry of client
    0's: the first conv's columns if that ran as one GEMM, channels-last only)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gemm = channels_last and layers[0].kind == "conv"
    first, cols = _first_conv(layers[0], params, xb) if gemm else (None, None)
    flats, saved = [], []
    for c in range(xb.shape[0]):
        h = first[c].permute(0, 3, 1, 2) if first is not None else xb[c].contiguous(memory_format=fmt)
        mine: list[tuple] = [()] if gemm else []
        for layer in layers[1:] if gemm else layers:
            if layer.kind == "conv":
                bias = params[layer.bias][c] if layer.bias is not None else None
                mine.append((h,))
                h = F.conv2d(h, params[layer.weight][c], bias, layer.stride, layer.padding)  # type: ignore[index]
            elif layer.kind == "relu":
                h = torch.relu(h)
                mine.append((h,))
            else:
                out, idx = F.max_pool2d(h, layer.kernel, layer.stride, return_indices=True)
                mine.append((h, idx))
                h = out
        mine.append((h.shape,))
        saved.append(mine)
        flats.append(h.reshape(h.shape[0], -1))
    saved[0].append((cols,))
    return torch.stack(flats), saved


def _features_back_loop(
    layers: list[Layer],
    params: dict[str, torch.Tensor],
    grad: torch.Tensor,
    saved: list[list[tuple]],
    lr: float,
    channels_last: bool,
) -> None:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    (cols,) = saved[0].pop()
    stop = 1 if cols is not None else 0
    for c, mine in enumerate(saved):
        g = grad[c].view(mine[-1][0]).contiguous(memory_format=fmt)
        for i in range(len(layers) - 1, stop - 1, -1):
            layer, keep = layers[i], mine[i]
            if layer.kind == "conv":
                w = params[layer.weight][c]  # type: ignore[index]
                bias = params[layer.bias][c] if layer.bias is not None else None
                dx, dw, db = torch.ops.aten.convolution_backward(
                    g, keep[0], w, None if bias is None else [w.shape[0]], [layer.stride] * 2,
                    [layer.padding] * 2, [1, 1], False, [0, 0], 1, [i > 0, True, bias is not None],
                )  # fmt: skip
                w.sub_(dw, alpha=lr)
                if bias is not None:
                    bias.sub_(db, alpha=lr)
                g = dx
            elif layer.kind == "relu":
                g = g * (keep[0] > 0)
            else:
                g = _pool_back(g, keep[0], keep[1], layer)
        if cols is not None:  # the first conv's update, folded into its weight-gradient GEMM
            w, dy = params[layers[0].weight][c], g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])  # type: ignore[index]
            w.view(w.shape[0], -1).addmm_(dy.t(), cols[c], alpha=-lr)  # dy: a view of a channels-last grad
            if layers[0].bias is not None:
                params[layers[0].bias][c].sub_(dy.sum(0), alpha=lr)


TILE_BYTES = 1 << 20  # a weight tile that stays in a 1-2 MB L2 between its two uses


def _linear_back(w: torch.Tensor, grad: torch.Tensor, inp: torch.Tensor, lr: float) -> torch.Tensor:
    """Input gradient `grad @ W` and the fused update `W -= lr grad^T inp` of stacked weights `[n, O, F]`.

    A large W (the first Linear of a CNN: 6 MB a client) is read from memory once instead of twice: it is
    walked in column tiles that stay in cache from the product that reads them to the update."""
    cols = max(64, TILE_BYTES // (w.shape[1] * w.element_size()))
    if cols >= w.shape[2]:
        below = torch.bmm(grad, w)  # needs the weights before their update
        w.baddbmm_(grad.transpose(1, 2), inp, alpha=-lr)
        return below
    below = grad.new_empty(*grad.shape[:2], w.shape[2])
    for c in range(w.shape[0]):
        for a in range(0, w.shape[2], cols):
            tile = w[c, :, a : a + cols]
            torch.mm(grad[c], tile, out=below[c, :, a : a + cols])
            tile.addmm_(grad[c].t(), inp[c, :, a : a + cols], alpha=-lr)
    return below


def _head(
    head: list[Layer], params: dict[str, torch.Tensor], h: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The Linear/ReLU layers after Flatten, batched over clients: logits, each Linear's input and output."""
    inputs, pre = [], []
    for layer in head:
        if layer.kind == "relu":
            h = torch.relu(h)
            continue
        inputs.append(h)
        w = params[layer.weight]  # type: ignore[index]
        bias = params[layer.bias].unsqueeze(1) if layer.bias is not None else None
        h = torch.bmm(h, w.transpose(1, 2)) if bias is None else torch.baddbmm(bias, h, w.transpose(1, 2))
        pre.append(h)
    return h, inputs, pre


def _logits(layers: list[Layer], params: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
    """Forward pass only (no update), as stacked_step computes it."""
    split = next(i for i, layer in enumerate(layers) if layer.kind == "flatten")
    with torch.no_grad():
        return _head(layers[split + 1 :], params, _features_loop(layers[:split], params, xb, False)[0])[0]


def _pool_before_relu(layers: list[Layer]) -> list[Layer]:
    """ReLU then max-pool as max-pool then ReLU: the same values and gradients (max commutes with a
    non-decreasing map; where the window's max is <= 0 both give a zero gradient), on 4x fewer elements."""
    out = list(layers)
    for i in range(len(out) - 1):
        if out[i].kind == "relu" and out[i + 1].kind == "pool":
            out[i], out[i + 1] = out[i + 1], out[i]
    return out


def masked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each client's mean cross-entropy over its unmasked samples, and its gradient with respect to the
    logits (softmax - one-hot, scaled by 1/count; 0 for padding): the start of every hand-written backward."""
    log_p = torch.log_softmax(logits, -1)
    picked = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    scale = mask / counts.clamp(min=1).unsqueeze(1)  # d(mean loss)/d(sample loss); 0 for padding
    per_client = -(picked * scale).sum(1)
    grad = log_p.exp_()
    grad.scatter_add_(-1, targets.unsqueeze(-1), -torch.ones_like(picked).unsqueeze(-1))
    return per_client, grad.mul_(scale.unsqueeze(-1))


def stacked_step(
    layers: list[Layer],
    params: dict[str, torch.Tensor],
    xb: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    counts: torch.Tensor,
    lr: float,
    mode: str = "loop-cl",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One plain-SGD step of every client's stack (updates `params` in place); returns (logits, mean loss).

    `mode`: how the conv layers run: "im2col" (batched over clients), "loop" or "loop-cl" (per client,
    NCHW or channels-last). The Linear layers always run batched, their update fused into the gradient."""
    split = next(i for i, layer in enumerate(layers) if layer.kind == "flatten")
    convs, head = _pool_before_relu(layers[:split]), layers[split + 1 :]
    with torch.no_grad():
        if mode == "im2col":
            h, saved = _features_im2col(convs, params, xb)
        else:
            h, saved = _features_loop(convs, params, xb, mode == "loop-cl")  # type: ignore[assignment]
        logits, inputs, pre = _head(head, params, h)
        per_client, grad = masked_cross_entropy(logits, targets, mask, counts)
        linears = [layer for layer in head if layer.kind == "linear"]
        relu_after = [
            i + 1 < len(head) and head[i + 1].kind == "relu"
            for i, layer in enumerate(head)
            if layer.kind == "linear"
        ]
        for j in range(len(linears) - 1, -1, -1):
            layer = linears[j]
            w = params[layer.weight]  # type: ignore[index]
            below = _linear_back(w, grad, inputs[j], lr)
            if layer.bias is not None:
                params[layer.bias].sub_(grad.sum(1), alpha=lr)
            grad = below.mul_(pre[j - 1] > 0) if j > 0 and relu_after[j - 1] else below
        if mode == "im2col":
            _features_back_im2col(convs, params, grad, saved, lr)
        else:
            _features_back_loop(convs, params, grad, saved, lr, mode == "loop-cl")  # type: ignore[arg-type]
    return logits, per_client
