"""Curvature rules for common layers (issue 13, item 3): every rule against
autograd in float64.

Two checks per rule:

- the rule alone: for y = op(x) with random g, H at y, the rule's H at x equals
  diag(J^T diag(H) J) + sum_j g_j d2y_j/dx^2 (OBD) and diag(J^T diag(H) J) (LM),
  by brute force (testing.brute_rule_diagonal);
- in a model where the sweep's result is exact: a per-entry scale s before the
  op and an elementwise loss after it (``L = mse(op(s * x0), t)``), so the
  Hessian in s is diag(x0)^2 times the op's own squared-Jacobian rule: ``obd``
  equals the Hessian's diagonal (method='exact') and ``lm`` the Gauss-Newton
  diagonal; and a layer's own parameters directly under the loss.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from obd_ext.curvature import hessian_diag, rules
from testing import brute_rule_diagonal, float64_by_default  # noqa: F401  (autouse fixture: every test in float64)


def _gn_diag(fn, s: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The Gauss-Newton diagonal in s of mse(fn(s * x0), t, 'sum')."""
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.reshape(s.shape) * x0).reshape(-1), s.detach().reshape(-1))
    return (2.0 * jac ** 2).sum(0).reshape(s.shape)


class Scaled(nn.Module):
    """y = fn(s * x): a per-entry scale before the op under test."""

    def __init__(self, fn, shape, gen):
        super().__init__()
        self.fn = fn
        self.s = nn.Parameter(1.0 + 0.3 * torch.randn(shape, generator=gen))

    def forward(self, x):
        return self.fn(self.s * x)


def check_scaled(fn, shape, seed=0, x0=None):
    """obd equals the Hessian's diagonal and lm the Gauss-Newton diagonal in s, exactly."""
    gen = torch.Generator().manual_seed(seed)
    model = Scaled(fn, shape, gen)
    x0 = torch.randn(shape, generator=gen) if x0 is None else x0
    with torch.no_grad():
        t = torch.randn(fn(x0).shape, generator=gen)
    loss = nn.MSELoss(reduction="sum")
    ex = hessian_diag(model, loss, (x0, t), method="exact", progress=False)["s"]
    ob = hessian_diag(model, loss, (x0, t), method="obd", progress=False)["s"]
    lm = hessian_diag(model, loss, (x0, t), method="lm", progress=False)["s"]
    torch.testing.assert_close(ob, ex, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(lm, _gn_diag(fn, model.s, x0, t), rtol=1e-9, atol=1e-10)
    return ob


def check_rule(fn, x, idx=0):
    """The node's rule alone against brute force, OBD and LM, and its gradient."""
    x = x.detach().requires_grad_()
    y = fn(x)
    gen = torch.Generator().manual_seed(3)
    g, h = torch.randn(y.shape, generator=gen), torch.rand(y.shape, generator=gen)
    full, gn = brute_rule_diagonal(fn, x, g, h)
    for lm in (False, True):
        ctx = rules.Ctx(lm)
        ctx.g_wanted = [True] * len(y.grad_fn.next_functions)
        g_in, h_in = rules.rule_for(y.grad_fn)(y.grad_fn, [g], [h], ctx)
        got = h_in[idx]
        got = got if got.shape == x.shape else got.sum_to_size(x.shape)
        torch.testing.assert_close(got, gn if lm else full, rtol=1e-9, atol=1e-10)
        if not lm:
            vjp = torch.autograd.grad(y, x, g, retain_graph=True)[0]
            gi = g_in[idx] if g_in[idx].shape == x.shape else g_in[idx].sum_to_size(x.shape)
            torch.testing.assert_close(gi, vjp, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------
# Normalisations with statistics of the input
# ---------------------------------------------------------------------------

NORMS = {
    "group_norm": lambda v: F.group_norm(v, 2, torch.linspace(0.5, 2, 4), torch.linspace(-1, 1, 4)),
    "group_norm_plain": lambda v: F.group_norm(v, 4),
    "instance_norm": lambda v: F.instance_norm(v, weight=torch.linspace(0.5, 2, 4), bias=torch.zeros(4)),
    "batch_norm_train": lambda v: F.batch_norm(v, None, None, torch.linspace(0.5, 2, 4), None, training=True),
}


@pytest.mark.parametrize("op", list(NORMS))
def test_norm_rules(op):
    x = torch.randn(2, 4, 3, 2, generator=torch.Generator().manual_seed(1))
    if op != "instance_norm":  # a batch norm between two views: not one node
        check_rule(NORMS[op], x)
    check_scaled(NORMS[op], (2, 4, 3, 2))


@pytest.mark.parametrize("layer", ["group", "instance", "batch_train"])
def test_norm_layer_parameters_under_the_loss(layer):
    torch.manual_seed(0)
    norm = {"group": nn.GroupNorm(2, 4), "instance": nn.InstanceNorm2d(4, affine=True),
            "batch_train": nn.BatchNorm2d(4)}[layer]
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), norm).train()
    x, t = torch.randn(3, 3, 5, 5), torch.randn(3, 4, 3, 3)
    names = ["1.weight", "1.bias"]
    ex = hessian_diag(model, nn.MSELoss(), (x, t), method="exact", params=names, progress=False)
    for method in ("obd", "lm"):
        got = hessian_diag(model, nn.MSELoss(), (x, t), method=method, progress=False)
        for k in names:
            torch.testing.assert_close(got[k], ex[k], rtol=1e-9, atol=1e-12)
