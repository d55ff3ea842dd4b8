"""Shared test settings: devices, dtypes, and input distributions.

On a machine with a GPU, CUDA is always among the devices, and a test that
needs a CUDA kernel fails (never skips) when the build lacks it.
"""

from __future__ import annotations

import copy
import math
from typing import List, Sequence, Tuple

import pytest
import torch

import obd_ext

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Distributions that break naive radix selects.
DISTRIBUTIONS = ["normal", "all_equal", "half_zeros", "few_ulps", "huge_range", "negative_curvature"]


def require_kernels(device: str) -> None:
    if device == "cuda":
        assert obd_ext.has_cuda_kernels(), "CUDA is available but obd_ext was built without its CUDA kernels"


def make_pair(shape, dist: str, wdtype, hdtype, device="cpu", seed=0) -> Tuple[torch.Tensor, torch.Tensor]:
    """A weight and a curvature tensor of one of DISTRIBUTIONS."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    w = torch.randn(n, generator=g, dtype=torch.float64)
    h = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    if dist == "all_equal":
        w = torch.full((n,), 0.5, dtype=torch.float64)
        h = torch.ones(n, dtype=torch.float64)
    elif dist == "half_zeros":
        w[torch.rand(n, generator=g) < 0.5] = 0.0
    elif dist == "few_ulps":
        # saliencies a few ulps apart: w fixed, h = 1 + j ulp (in float32/bf16 terms)
        w = torch.ones(n, dtype=torch.float64)
        eps = 2.0 ** -7 if torch.bfloat16 in (wdtype, hdtype) else (2.0 ** -10 if torch.float16 in (wdtype, hdtype) else 2.0 ** -23)
        h = 1.0 + eps * torch.randint(0, 4, (n,), generator=g).double()
    elif dist == "huge_range":
        lo, hi = (-6, 6) if torch.float16 in (wdtype, hdtype) else (-30, 30)
        w = w * torch.pow(10.0, torch.randint(lo, hi, (n,), generator=g).double())
        h = h * torch.pow(10.0, torch.randint(lo, hi, (n,), generator=g).double())
    elif dist == "negative_curvature":
        h = torch.randn(n, generator=g, dtype=torch.float64)
    w = w.to(wdtype).reshape(shape).to(device)
    h = h.to(hdtype).reshape(shape).to(device)
    # float16 overflow of extreme values would turn into Inf: keep inputs finite.
    w = torch.nan_to_num(w, posinf=1.0, neginf=-1.0)
    h = torch.nan_to_num(h, posinf=1.0, neginf=-1.0)
    return w, h


def random_masks(tensors: Sequence[torch.Tensor], p_deleted: float, seed=0) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(t.shape, generator=g) >= p_deleted).to(t.device) for t in tensors]


def k_values(n: int) -> List[int]:
    return sorted({0, min(1, n), n // 2, max(n - 1, 0), n})


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (a transposed copy, transposed back)."""
    if t.dim() < 2:
        return t.repeat_interleave(2)[::2]
    return t.transpose(0, 1).contiguous().transpose(0, 1)


def assert_stats_close(a: torch.Tensor, b: torch.Tensor) -> None:
    a, b = a.cpu(), b.cpu()
    assert torch.equal(a[:3], b[:3]), (a, b)  # counts are exact
    torch.testing.assert_close(a[3:], b[3:], rtol=1e-9, atol=1e-300, equal_nan=True)


param_device = pytest.mark.parametrize("device", DEVICES)


@pytest.fixture(autouse=True)
def float64_by_default():
    """Imported by modules whose every test works in float64; restores the default afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def brute_rule_diagonal(fn, x, g_out, h_out):
    """For y = fn(x) (any shapes), by autograd over flattened x: the sweep rule's exact result
    diag(J^T diag(h) J) + sum_j g_j d2y_j/dx_i^2, and its Gauss-Newton part diag(J^T diag(h) J)."""
    xf = x.detach().reshape(-1)
    f = lambda v: fn(v.reshape(x.shape)).reshape(-1)  # noqa: E731
    jac = torch.autograd.functional.jacobian(f, xf)
    gn = (jac ** 2 * h_out.reshape(-1)[:, None]).sum(0)
    hes = torch.autograd.functional.hessian(lambda v: (f(v) * g_out.reshape(-1)).sum(), xf)
    return (gn + torch.diagonal(hes)).reshape(x.shape), gn.reshape(x.shape)


def fisher_by_loop(model, loss_fn, x, t):
    """c * sum_n (d l_n / d theta)^2 with c read off the loss itself: c = loss / sum_n l_n
    (l_n: sample n's loss under reduction "sum"), so no normalisation rule is restated."""
    summed = copy.copy(loss_fn)
    summed.reduction = "sum"
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    acc = {k: torch.zeros_like(p) for k, p in params.items()}
    total = 0.0
    for b in range(x.shape[0]):
        loss = summed(model(x[b:b + 1]), t[b:b + 1])
        total += float(loss.detach())
        for k, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
            acc[k] += g * g
    with torch.no_grad():
        c = float(loss_fn(model(x), t)) / total
    return {k: v * c for k, v in acc.items()}
