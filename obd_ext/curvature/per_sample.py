"""Squared per-sample gradients layer by layer, for ``fisher`` and ``ggn-mc``.

Both estimators need ``c * sum_n g_n^2``, with ``g_n`` the gradient of sample
n's loss alone. torch.func (estimators.py) gets every ``g_n`` by
differentiating the whole model once per sample: a chunk of samples times
every parameter in memory, and 1.5-4.4x a forward and backward pass. Here:

1. one forward pass, and one backward pass that stops at the outputs of the
   operations that use a wanted parameter: it gives G, the gradient of the
   batch loss at each such output, and never forms a parameter gradient;
2. each use of a parameter turns its input X (saved by autograd) and G into
   the per-sample gradients of that parameter, a chunk of samples at a time:
   ``G_b^T X_b`` over a sample's rows for a Linear or matmul, the
   weight-gradient convolution of each sample (one grouped call per chunk),
   G's rows added at a sample's indices for an embedding, the sum of
   ``G * x_hat`` for a norm's weight, sums of G for biases;
3. a parameter with several uses (a tied embedding and output head) adds its
   uses' per-sample gradients before squaring (eq. 5); the squares are
   summed over the samples.

Memory holds at most ``chunk x one parameter`` of per-sample gradients, the
chunk chosen from a byte budget. A Linear with one row per sample needs none:
the sum of its squared outer products is ``(G*G)^T (X*X)``.

Why the autograd graph and not module hooks: the graph records functional
uses (``x @ tok.weight.t()`` for a tied head, ``F.linear``, ``F.conv2d``) as
well as modules; it wires every use of a parameter to the parameter's one
AccumulateGrad node, so tied weights are found without knowing the model; its
nodes keep X (``node._saved_*``); and a backward whose inputs are the uses'
output edges (``GradientEdge``) skips the weight-gradient products, where
full backward hooks would make autograd compute every parameter gradient.

Which rows belong to which sample is not guessed from shapes: a probe runs
the first sample alone through the model. A tensor whose leading dimension
is B times the probe's holds ``k`` = (probe's) rows per sample, in sample-major
order, and its first ``k`` rows must equal the probe's (X of every use, and
the model output). A model that runs its layers on (token, batch) rows, or
mixes samples (BatchNorm in training mode), fails this and takes the
per-sample path. A tensor with the probe's own shape has no batch dimension
(a position embedding): its use gets G from where it is broadcast over the
batch (an add), one sample's slice summed back to its shape.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.autograd.graph import GradientEdge

from .. import ops
from .graph import check_graph
from .losses import per_sample_scale, sampled_targets
from .rules import registry_entry

__all__ = ["CHUNK_BYTES", "layerwise_squared"]

# Bytes of per-sample gradients (and their workspace) held at once: at least one
# sample's gradient of the parameter at hand, else small enough that squaring
# them reads the last-level cache rather than memory.
CHUNK_BYTES = 4 << 20

# Nodes between a parameter and its use that only relabel its entries.
_RESHAPES = {"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "UnsqueezeBackward0",
             "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2", "FlattenBackward0"}
_SAME = {"ToCopyBackward0", "CloneBackward0", "AliasBackward0", "ContiguousBackward0"}
_CHAIN = _RESHAPES | _SAME | {"TBackward0", "ExpandBackward0"}


@dataclass
class _Use:
    """One use of a parameter: ``node``'s input ``slot``, reached from the
    parameter through ``chain`` (use side first)."""

    node: object
    slot: int
    chain: Tuple[object, ...]
    kind: Optional[str]
    shape: Tuple[int, ...] = ()          # the use's output
    k: Optional[int] = None              # its rows per sample; None: no batch dimension (lifted)
    saved: Dict[str, object] = field(default_factory=dict)
    kx: Dict[str, Optional[int]] = field(default_factory=dict)  # rows per sample of each saved tensor
    skip: int = 0                        # chain nodes folded into the use (an expand before an add)
    cap: object = None                   # node whose output gradient is captured
    cap_k: int = 1
    coef: float = 1.0                    # lifted: d(cap output) / d(use output), and the shape in between
    bshape: Tuple[int, ...] = ()


def _walk(root) -> Tuple[List[object], Dict[object, List[Tuple[object, int, int]]]]:
    """Nodes in a deterministic order, and each node's consumers (node, slot, output number)."""
    order, seen, stack = [], {root}, [root]
    consumers: Dict[object, List[Tuple[object, int, int]]] = defaultdict(list)
    while stack:
        node = stack.pop()
        order.append(node)
        for slot, (child, nr) in enumerate(node.next_functions):
            if child is None:
                continue
            consumers[child].append((node, slot, nr))
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return order, consumers


def _out_shape(node, nr: int = 0) -> Tuple[int, ...]:
    return tuple(int(s) for s in node._input_metadata[nr].shape)


def _in_shape(node, slot: int) -> Tuple[int, ...]:
    child, nr = node.next_functions[slot]
    return _out_shape(child, nr)


def _rows(full: Sequence[int], probe: Sequence[int], batch: int):
    """Rows per sample of a tensor of shape ``full`` whose one-sample version has
    shape ``probe``: an int, None (no batch dimension), or -1 (neither)."""
    full, probe = tuple(full), tuple(probe)
    if len(full) != len(probe) or not full or full[1:] != probe[1:]:
        return -1
    if full[0] == batch * probe[0]:
        return probe[0]
    return None if full == probe else -1


def _same(a: Tensor, b: Tensor) -> bool:
    """Equal up to the rounding of a different batch size."""
    if a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    scale = float(b.detach().abs().max())
    tol = (1e-3 if a.element_size() >= 4 else 5e-2) * scale
    return float((a.detach() - b.detach()).abs().max()) <= tol


def _kind(node, slot: int) -> Optional[Tuple[str, Dict[str, object]]]:
    """What a parameter's use computes and the saved tensors it needs, from the
    node type's registry entry (rules.py); None: not handled here."""
    entry = registry_entry(node)
    use = entry.param_use if entry is not None else None
    return use(node, slot) if use is not None else None


def _uses(acc, consumers, chain=()) -> List[_Use]:
    """Every use reached from ``acc`` (an AccumulateGrad node) through relabelling nodes;
    a use that is not handled here comes back with kind None."""
    out = []
    for node, slot, _ in consumers.get(acc, []):
        name = type(node).__name__
        if name in _CHAIN:
            out += _uses(node, consumers, (node,) + chain)
            continue
        k = _kind(node, slot)
        u = _Use(node, slot, chain, None) if k is None else _Use(node, slot, chain, k[0], saved=k[1])
        # An explicit expand before an elementwise use is the broadcasting the use
        # would do itself: fold it (and dtype copies before it) into the use.
        n_exp = [type(n).__name__ for n in chain].count("ExpandBackward0")
        if n_exp and u.kind in ("add", "mul"):
            for i, n in enumerate(chain):
                if type(n).__name__ == "ExpandBackward0":
                    u.skip = i + 1
                    n_exp -= 1
                    if not n_exp:
                        break
                elif type(n).__name__ not in _SAME:
                    break
        if any(type(n).__name__ == "ExpandBackward0" for n in chain[u.skip:]):
            u.kind = None
        out.append(u)
    return out


def _batch_norm_in_training(order) -> bool:
    return any(type(n).__name__ in ("NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0")
               and bool(getattr(n, "_saved_training", True)) for n in order)


def _lift(u: _Use, node1, consumers, consumers1, batch: int) -> bool:
    """For a use whose output has no batch dimension: find where it is broadcast
    over the batch (an add, or an expand, after reshapes), to capture G there.
    ``node1`` is the use in the probe's graph, walked alongside."""
    node, nr, coef = u.node, 0, 1.0
    while True:
        cons = [c for c in consumers.get(node, []) if c[2] == nr]
        cons1 = [c for c in consumers1.get(node1, []) if c[2] == nr]
        if len(cons) != 1 or len(cons1) != 1 or type(cons[0][0]) is not type(cons1[0][0]):
            return False
        (nxt, slot, _), nxt1 = cons[0], cons1[0][0]
        name = type(nxt).__name__
        if name in _RESHAPES or name in _SAME:
            node, node1, nr = nxt, nxt1, 0
            continue
        if name not in ("AddBackward0", "SubBackward0", "ExpandBackward0"):
            return False
        if name != "ExpandBackward0":
            alpha = float(getattr(nxt, "_saved_alpha", 1.0))
            coef = 1.0 if slot == 0 else (alpha if name == "AddBackward0" else -alpha)
        k = _rows(_out_shape(nxt), _out_shape(nxt1), batch)
        if not isinstance(k, int) or k < 0:
            return False
        u.cap, u.cap_k, u.coef, u.bshape = nxt, k, coef, _out_shape(node, nr)
        return True


def _plan(model: nn.Module, x: Tensor, out: Tensor, names: Dict[int, str]
          ) -> Optional[Dict[str, Optional[List[_Use]]]]:
    """name -> the uses of that parameter (None: some use is not handled here);
    None when the model as a whole cannot be split by sample (the per-sample
    path then does everything)."""
    order, consumers = _walk(out.grad_fn)
    if _batch_norm_in_training(order):
        return None
    accs = {names[id(n.variable)]: n for n in order if hasattr(n, "variable") and id(n.variable) in names}
    plan: Dict[str, Optional[List[_Use]]] = {}
    for name in names.values():
        uses = _uses(accs[name], consumers) if name in accs else []  # unused: no uses, zero curvature
        plan[name] = uses if all(u.kind is not None for u in uses) else None
    for uses in plan.values():
        for u in uses or ():
            u.shape = _out_shape(u.node)
    batch = x.shape[0]
    if batch == 1:  # every row is the one sample's
        for uses in plan.values():
            for u in uses or ():
                u.k, u.cap, u.cap_k = u.shape[0], u.node, u.shape[0]
                u.kx = {k: v.shape[0] for k, v in u.saved.items() if isinstance(v, Tensor) and v.dim()}
        return {k: v if v is None or all(_broadcast_over_rows(u) for u in v) else None for k, v in plan.items()}
    if not any(plan.values()):
        return plan
    # The probe: the first sample alone. Its graph may differ elsewhere (ops pick
    # other kernels and views at batch 1); each parameter's uses are matched
    # through the parameter's AccumulateGrad node, which both graphs share.
    try:
        with torch.enable_grad():
            out1 = model(x[:1])
    except Exception:  # noqa: BLE001 - a model that cannot run one sample: per-sample path
        return None
    if not isinstance(out1, Tensor) or out1.grad_fn is None:
        return None
    k_out = _rows(out.shape, out1.shape, batch)
    if not isinstance(k_out, int) or k_out < 0 or not _same(out[:k_out], out1):
        return None
    _, consumers1 = _walk(out1.grad_fn)
    for name, uses in plan.items():
        if not uses:
            continue
        uses1 = _uses(accs[name], consumers1)
        same = len(uses1) == len(uses) and all(
            (a.kind, a.slot, type(a.node), [type(n) for n in a.chain]) == (b.kind, b.slot, type(b.node),
                                                                        [type(n) for n in b.chain])
            for a, b in zip(uses, uses1))
        if not same or not all(_check(u, u1, consumers, consumers1, batch) for u, u1 in zip(uses, uses1)):
            plan[name] = None
    return plan


# Saved operands that may have no batch dimension in a batched use: a factor
# broadcast over the batch, BatchNorm's running statistics.
_UNBATCHED_OK = {("mul", "x"), ("bn_w", "mean"), ("bn_w", "var")}


def _check(u: _Use, u1: _Use, consumers, consumers1, batch: int) -> bool:
    """Find the use's rows per sample (or where it is broadcast over the batch),
    and check that its operands' first sample matches the probe's use ``u1``."""
    k = _rows(u.shape, _out_shape(u1.node), batch)
    if k == -1:
        return False
    if k is None:
        if not _lift(u, u1.node, consumers, consumers1, batch):
            return False
    else:
        u.k, u.cap, u.cap_k = k, u.node, k
    if u.k is not None and not _broadcast_over_rows(u):
        return False
    checked = False
    for key, v in u.saved.items():
        if not isinstance(v, Tensor):
            continue
        v1 = u1.saved.get(key)
        if not isinstance(v1, Tensor):
            return False
        kx = _rows(v.shape, v1.shape, batch)
        if kx == -1:
            return False
        if kx is None and u.k is not None and (u.kind, key) not in _UNBATCHED_OK:
            return False
        if kx is not None and u.k is None:
            return False
        if not _same(v if kx is None else v[:kx], v1):
            return False
        u.kx[key] = kx
        checked = checked or kx is not None
    # Where the batch is folded into rows with other entries (k > 1), only a
    # batched operand equal to the probe's shows that a sample's rows are
    # contiguous; a lone add (a free bias) saves none. With one row per sample
    # (k = 1) the leading dimension is the one that grows with the batch.
    rows = u.k if u.k is not None else u.cap_k
    return checked or rows == 1


def _broadcast_over_rows(u: _Use) -> bool:
    """A parameter that enters elementwise (a bias, a scale) must be broadcast
    over the rows of the batch, not hold one entry per row."""
    if u.kind == "addmm_bias":
        return math.prod(_slot_shape(u)) == u.shape[-1]
    if u.kind in ("add", "mul"):
        slot = _slot_shape(u)
        return len(slot) < len(u.shape) or slot[0] == 1
    return True


def _samples(t: Tensor, k: Optional[int], s: int, e: int) -> Tensor:
    """Samples s..e of a tensor with k rows per sample: (e - s, k, ...); a tensor
    without a batch dimension (k None) is the same for every sample: (e - s, ...)."""
    if k is None:
        return t.unsqueeze(0).expand((e - s,) + tuple(t.shape))
    return t[s * k:e * k].reshape((e - s, k) + tuple(t.shape[1:]))


def _reduce(t: Tensor, shape: Sequence[int]) -> Tensor:
    """Each sample of t (c, *S) summed to ``shape`` the way broadcasting would."""
    c, per = t.shape[0], t.dim() - 1
    pad = (1,) * (per - len(shape)) + tuple(shape)
    return t.sum_to_size((c,) + pad).reshape((c,) + tuple(shape))


def _to_param(u: _Use, t: Tensor) -> Tensor:
    """Per-sample gradients at the use's input slot (c, ...) -> in the parameter's layout."""
    c = t.shape[0]
    for n in u.chain[u.skip:]:
        name = type(n).__name__
        if name == "TBackward0":
            t = t.transpose(-1, -2)
        elif name in _RESHAPES:
            t = t.reshape((c,) + _in_shape(n, 0))
    return t


def _slot_shape(u: _Use) -> Tuple[int, ...]:
    """The shape of the parameter's value where the use takes it (before a folded expand)."""
    return _in_shape(u.chain[u.skip - 1], 0) if u.skip else _in_shape(u.node, u.slot)


def _p_layout(u: _Use) -> bool:
    """Whether the use's natural product is already in the parameter's layout."""
    names = [type(n).__name__ for n in u.chain]
    if u.kind == "mat2":
        return names in ([], ["TBackward0"])
    return not names


class _Layerwise:
    """Per-sample gradients of one parameter's uses, from the captured G."""

    def __init__(self, grads: Dict[object, Tensor], batch: int):
        self.grads, self.batch = grads, batch

    def g(self, u: _Use, s: int, e: int) -> Tensor:
        """The per-sample G at the use's output: (c, k, ...) or, lifted, (c, *shape)."""
        gc = self.grads[u.cap]
        if u.cap is u.node:
            return _samples(gc, u.k, s, e)
        per = _samples(gc, u.cap_k, s, e)
        per = per.reshape((e - s,) + tuple(per.shape[1:]))
        red = _reduce(per, u.bshape)
        if u.coef != 1.0:
            red = red * u.coef
        return red.reshape((e - s,) + u.shape)

    def x(self, u: _Use, key: str, s: int, e: int) -> Tensor:
        return _samples(u.saved[key], u.kx.get(key), s, e)

    def contribution(self, u: _Use, s: int, e: int, out: Optional[Tensor] = None) -> Tensor:
        """(c, *parameter shape): the per-sample gradients this use adds; written
        into ``out`` (the chunk's workspace) where the product can be, else new."""
        c = e - s
        g = self.g(u, s, e)
        kind = u.kind
        direct = out is not None and _p_layout(u) and g.dtype == out.dtype
        if kind == "mat2":
            x = self.x(u, "x", s, e)
            x = x.reshape(c, -1, x.shape[-1])
            g = g.reshape(c, -1, g.shape[-1])
            alpha = u.saved["alpha"]
            # x^T g is the slot's (in, out) layout; through W.t() (a Linear) g^T x is the weight's.
            a, b = (g.transpose(1, 2), x) if direct and u.chain else (x.transpose(1, 2), g)
            if direct and x.dtype == out.dtype:
                t = torch.bmm(a, b, out=out)
            else:
                t = torch.bmm(a, b)
            if alpha != 1.0:
                t.mul_(alpha)
            return t if direct else _to_param(u, t)
        if kind == "conv_w":
            return _to_param(u, self._conv_weight(u, g, s, e))
        if kind == "embedding":
            rows = u.saved["rows"]
            d = g.shape[-1]
            idx = self.x(u, "x", s, e).reshape(c, -1)
            g = g.reshape(c, -1, d)
            if u.saved["padding_idx"] >= 0:
                g = g * (idx != u.saved["padding_idx"]).unsqueeze(-1).to(g.dtype)
            keys = (idx + torch.arange(c, device=idx.device).unsqueeze(1) * rows).reshape(-1)
            t = out.zero_() if direct else torch.zeros((c, rows, d), dtype=g.dtype, device=g.device)
            t.view(c * rows, d).index_add_(0, keys, g.reshape(-1, d))
            return t if direct else _to_param(u, t)
        if kind == "addmm_bias":
            t = g.reshape(c, -1, g.shape[-1]).sum(1) * u.saved["beta"]
            t = t.reshape((c,) + _slot_shape(u))
        elif kind == "conv_b":
            t = g.reshape(c, -1, u.shape[1], math.prod(u.shape[2:])).sum((1, 3))
        elif kind == "ln_w":
            n = u.saved["n"]
            xh = (self.x(u, "x", s, e) - self.x(u, "mean", s, e)) * self.x(u, "rstd", s, e)
            t = (g.reshape(c, -1, n) * xh.reshape(c, -1, n)).sum(1).reshape((c,) + _slot_shape(u))
        elif kind == "norm_b":
            n = math.prod(_slot_shape(u))
            t = g.reshape(c, -1, n).sum(1).reshape((c,) + _slot_shape(u))
        elif kind in ("bn_w", "gn_w"):
            ch = u.shape[1]
            x = self.x(u, "x", s, e)
            if kind == "bn_w":
                view = (1, 1, ch) + (1,) * (len(u.shape) - 2)
                xh = (x - u.saved["mean"].reshape(view)) * torch.rsqrt(u.saved["var"] + u.saved["eps"]).reshape(view)
            else:
                grp = u.saved["groups"]
                mean = self.x(u, "mean", s, e).reshape(-1, grp, 1)
                rstd = self.x(u, "rstd", s, e).reshape(-1, grp, 1)
                xh = ((x.reshape(mean.shape[0], grp, -1) - mean) * rstd).reshape(x.shape)
            t = (g * xh).reshape(c, -1, ch, math.prod(u.shape[2:])).sum((1, 3)).reshape((c,) + _slot_shape(u))
        elif kind == "bn_b":
            t = g.reshape(c, -1, u.shape[1], math.prod(u.shape[2:])).sum((1, 3)).reshape((c,) + _slot_shape(u))
        elif kind == "add":
            t = _reduce(g.reshape((c,) + tuple(g.shape[1:])), _slot_shape(u))
            t = t * u.saved["coef"] if u.saved["coef"] != 1.0 else t
        elif kind == "mul":
            other = u.saved["x"]
            if u.k is None:
                o = other.expand(u.shape).unsqueeze(0)
            else:
                o = _samples(other.expand(u.shape), u.k, s, e)
            t = _reduce(g * o, _slot_shape(u))
        else:  # pragma: no cover - _kind lists every kind
            raise AssertionError(kind)
        return _to_param(u, t)

    def _conv_weight(self, u: _Use, g: Tensor, s: int, e: int) -> Tensor:
        c = e - s
        x = self.x(u, "x", s, e)  # (c, n, C_in, ...): n sub-batch rows per sample (or a lifted use's batch)
        x = x.reshape((c, -1) + tuple(x.shape[-(len(u.shape) - 1):]))
        g = g.reshape((c, -1) + u.shape[1:])
        wshape = _slot_shape(u)
        groups = u.saved["groups"]
        nd = len(u.shape) - 2
        # Each sample's weight gradient in one grouped convolution: the chunk's
        # samples become groups (channels sample-major), their sub-batch rows the
        # batch. The 4 MiB chunks keep many groups to small weights, where oneDNN
        # runs them as fast as one batched call; on large weights (512 x 512 x 3 x 3
        # on 4 x 4 maps) grouped calls are 4-6x slower than one sample at a time,
        # and so is a batched GEMM on unfolded inputs with its inner dimension of 16
        # (measured with 2 threads; with 1 the unfolded GEMM is 20% faster there).
        n = x.shape[1]
        xs = x.transpose(0, 1).reshape((n, -1) + tuple(x.shape[3:]))
        gs = g.transpose(0, 1).reshape((n, -1) + tuple(g.shape[3:]))
        w = xs.new_empty((c * wshape[0],) + wshape[1:])  # only its shape is read
        gw = torch.ops.aten.convolution_backward(gs, xs, w, None, u.saved["stride"], u.saved["padding"],
                                                 u.saved["dilation"], False, [0] * nd, c * groups,
                                                 [False, True, False])[1]
        return gw.reshape((c,) + wshape)


def _workspace_per_sample(p: Tensor, uses: List[_Use]) -> int:
    """Bytes one sample needs: its gradient of p, plus what the uses form on the way."""
    item = p.element_size()
    extra = 0
    for u in uses:
        if u.kind not in ("mat2", "embedding"):  # a new tensor of per-sample gradients
            extra = max(extra, p.numel() * item)
    return p.numel() * item + extra


def _single_squared(u: _Use, p: Tensor, lw: _Layerwise, budget: int) -> Optional[Tensor]:
    """sum_b g_b^2 for a parameter with one use, where a closed form needs no per-sample gradients."""
    if u.kind == "mat2" and u.k == 1 and u.kx.get("x") == 1 and u.cap is u.node:
        x, g, a = u.saved["x"], lw.grads[u.node], u.saved["alpha"]
        x, g = x.reshape(x.shape[0], -1), g.reshape(g.shape[0], -1)
        if len(u.chain) == 1 and type(u.chain[0]).__name__ == "TBackward0":
            h = ops.squared_mm(g.t(), x, True, True)
        else:
            h = _to_param(u, ops.squared_mm(x.t(), g, True, True).unsqueeze(0))[0]
        return h * (a * a) if a != 1.0 else h
    if u.kind == "addmm_bias" and u.k == 1 and u.cap is u.node and math.prod(_slot_shape(u)) == u.shape[-1]:
        g = lw.grads[u.node].reshape(-1, u.shape[-1])
        h = (g * g).sum(0).reshape(_slot_shape(u)) * (u.saved["beta"] ** 2)
        return _to_param(u, h.unsqueeze(0))[0]
    if u.kind == "embedding":
        # A sample's gradient touches only the rows it looks up: sum its G rows per
        # (sample, row) pair, square, and add into the table; no table per sample.
        d = u.shape[-1]
        m = max(1, math.prod(u.shape) // d // (u.k or 1))
        per = max(1, m * d * p.element_size() * 3)
        step = max(1, budget // per)
        h = torch.zeros(u.saved["rows"], d, dtype=_acc_dtype(p), device=p.device)
        for s in range(0, lw.batch, step):
            e = min(lw.batch, s + step)
            c = e - s
            g = lw.g(u, s, e).reshape(c, -1, d)
            idx = lw.x(u, "x", s, e).reshape(c, -1)
            if u.saved["padding_idx"] >= 0:
                g = g * (idx != u.saved["padding_idx"]).unsqueeze(-1).to(g.dtype)
            keys = (idx + torch.arange(c, device=idx.device).unsqueeze(1) * u.saved["rows"]).reshape(-1)
            uniq, inv = torch.unique(keys, return_inverse=True)
            sums = torch.zeros(uniq.numel(), d, dtype=g.dtype, device=g.device).index_add_(0, inv, g.reshape(-1, d))
            h.index_add_(0, uniq % u.saved["rows"], (sums * sums).to(h.dtype))
        return _to_param(u, h.unsqueeze(0))[0]
    return None


def _acc_dtype(p: Tensor) -> torch.dtype:
    return torch.promote_types(p.dtype, torch.float32)


def _squared(p: Tensor, uses: List[_Use], lw: _Layerwise, budget: int) -> Tensor:
    """sum over samples of (sum over uses of the per-sample gradient)^2.

    A chunk of samples at a time in one reused workspace: a fresh chunk-sized
    tensor per step costs its page faults, and a chunk that stays in the cache
    is squared from the cache (for a 512 x 512 x 3 x 3 convolution, one sample
    at a time is 2x faster than eight).
    """
    if len(uses) == 1:
        h = _single_squared(uses[0], p, lw, budget)
        if h is not None:
            return h
    acc = torch.zeros(p.numel(), dtype=_acc_dtype(p), device=p.device)
    if not uses:
        return acc.reshape(p.shape)
    step = max(1, min(lw.batch, budget // max(1, _workspace_per_sample(p, uses))))
    dtype = lw.grads[uses[0].cap].dtype
    ws = torch.empty((step,) + tuple(p.shape), dtype=dtype, device=p.device)
    for s in range(0, lw.batch, step):
        e = min(lw.batch, s + step)
        total = None
        for u in uses:
            t = lw.contribution(u, s, e, ws[:e - s] if total is None else None)
            total = t if total is None else total + t
        flat = total.reshape(e - s, -1)
        if e - s <= 4 and flat.dtype == acc.dtype:  # ATen's vectorised loop on a row or two
            for row in flat:
                acc.addcmul_(row, row)
        else:
            ops.column_sq_sum_(acc, flat)  # one pass over all rows, no squared copy
    return acc.reshape(p.shape)


def layerwise_squared(model: nn.Module, loss_fn, x: Tensor, y: Tensor, params: Dict[str, Tensor],
                      sample_targets: bool, generator: Optional[torch.Generator], draws: int = 1,
                      budget: int = CHUNK_BYTES
                      ) -> Tuple[Optional[Dict[str, Tensor]], List[Tensor]]:
    """``c * sum_n g_n^2`` per parameter, averaged over ``draws`` target draws.

    Args:
        model, loss_fn, x, y: one batch (x's leading dimension is the sample).
        params: name -> parameter wanted.
        sample_targets: draw the targets from the model's output (ggn-mc).
        generator: for the draws.
        draws: target draws (ggn-mc's samples), all from one forward pass.
        budget: bytes of per-sample gradients held at once.

    Returns:
        (name -> curvature for the parameters handled here, or None when the
        model cannot be split by sample; the targets of each draw), so that the
        caller computes the rest from per-sample gradients with the same targets.
    """
    if not isinstance(x, Tensor) or x.dim() == 0:
        return None, []
    with torch.enable_grad():
        out = model(x)
    if isinstance(out, Tensor):
        check_graph([out.grad_fn], "ggn-mc" if sample_targets else "fisher")
    targets = [sampled_targets(out, loss_fn, generator, y) if sample_targets else y for _ in range(draws)]
    if not isinstance(out, Tensor) or out.grad_fn is None:
        return None, targets
    names = {id(p): k for k, p in params.items()}
    plan = _plan(model, x, out, names)
    if plan is None:
        return None, targets
    handled = {k: v for k, v in plan.items() if v is not None}
    result: Dict[str, Tensor] = {}
    caps: List[object] = []
    for uses in handled.values():
        for u in uses:
            if u.cap not in caps:
                caps.append(u.cap)
    for d, t in enumerate(targets):
        scale = per_sample_scale(loss_fn, out, t)
        grads: Dict[object, Tensor] = {}
        if caps:
            with torch.enable_grad():
                loss = loss_fn(out, t)
            gs = torch.autograd.grad(loss, [GradientEdge(n, 0) for n in caps], retain_graph=d < draws - 1,
                                     allow_unused=True)
            for n, gv in zip(caps, gs):
                grads[n] = gv.detach() if gv is not None else torch.zeros(_out_shape(n), dtype=out.dtype,
                                                                          device=out.device)
        lw = _Layerwise(grads, x.shape[0])
        with torch.no_grad():
            for name, uses in handled.items():
                p = params[name]
                h = (_squared(p, uses, lw, budget) / scale).to(p.dtype)
                result[name] = h if name not in result else result[name] + h
        del grads, lw
    if draws > 1:
        result = {k: v / draws for k, v in result.items()}
    return result, targets
