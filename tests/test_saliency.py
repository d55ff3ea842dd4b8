"""saliency and group_saliency against the reference; gradients with gradcheck."""

import pytest
import torch

import obd_ext
from obd_ext import reference
from testing import DISTRIBUTIONS, DTYPES, make_pair, noncontiguous, param_device, require_kernels

SHAPES = [(), (0,), (1,), (7,), (5, 3), (4, 3, 3, 3), (0, 4)]


@param_device
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("wdtype", DTYPES, ids=str)
@pytest.mark.parametrize("hdtype", DTYPES, ids=str)
def test_saliency_matches_reference_bitwise(device, shape, wdtype, hdtype):
    require_kernels(device)
    w, h = make_pair(shape, "normal", wdtype, hdtype, device)
    out = obd_ext.saliency(w, h)
    ref = reference.saliency(w, h)
    assert out.dtype == ref.dtype == (torch.float64 if torch.float64 in (wdtype, hdtype) else torch.float32)
    assert out.shape == w.shape and out.device == w.device
    assert torch.equal(out, ref)  # same operation order: bit for bit


@param_device
@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_saliency_distributions_and_layouts(device, dist):
    require_kernels(device)
    w, h = make_pair((9, 11), dist, torch.float32, torch.float32, device)
    assert torch.equal(obd_ext.saliency(noncontiguous(w), noncontiguous(h)), reference.saliency(w, h))
    assert torch.equal(obd_ext.saliency(w.t(), h.t()), reference.saliency(w, h).t())


@param_device
@pytest.mark.parametrize("shape,dim", [((6, 5), 0), ((6, 5), 1), ((6, 5), -1), ((4, 3, 2, 2), 0),
                                       ((4, 3, 2, 2), 1), ((7,), 0), ((0, 3), 1), ((3, 0), 0)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_saliency(device, shape, dim, dtype):
    require_kernels(device)
    w, h = make_pair(shape, "negative_curvature", dtype, dtype, device)
    out = obd_ext.group_saliency(w, h, dim)
    ref = reference.group_saliency(w, h, dim)
    assert out.dtype == ref.dtype and out.shape == (shape[dim],)
    torch.testing.assert_close(out, ref, rtol=1e-6 if ref.dtype == torch.float32 else 1e-12, atol=1e-6)
    torch.testing.assert_close(obd_ext.group_saliency(noncontiguous(w), noncontiguous(h), dim), out)


def test_gradcheck():
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(obd_ext.saliency, (w, h))
    assert torch.autograd.gradgradcheck(obd_ext.saliency, (w, h))
    for dim in (0, 1, -1):
        assert torch.autograd.gradcheck(lambda a, b: obd_ext.group_saliency(a, b, dim), (w, h))
    # only one input requiring grad
    assert torch.autograd.gradcheck(obd_ext.saliency, (w, h.detach()))


def test_gradient_values():
    w = torch.randn(5, requires_grad=True)
    h = torch.rand(5, requires_grad=True)
    obd_ext.saliency(w, h).sum().backward()
    torch.testing.assert_close(w.grad, h.detach() * w.detach())
    torch.testing.assert_close(h.grad, w.detach() ** 2 / 2)


def test_bad_arguments():
    w = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"hessian_diag must have the shape of weight \[3, 4\], got \[4, 3\]"):
        obd_ext.saliency(w, torch.rand(4, 3))
    with pytest.raises(RuntimeError, match=r"weight must be float32, float64, float16 or bfloat16, got Long"):
        obd_ext.saliency(w.long(), torch.rand(3, 4))
    with pytest.raises(RuntimeError, match=r"dim must be in \[-2, 1\] for a weight of shape \[3, 4\], got 2"):
        obd_ext.group_saliency(w, torch.rand(3, 4), 2)
    other = "cuda" if torch.cuda.is_available() else "meta"  # meta: checked by the fake kernel
    with pytest.raises(RuntimeError, match="one device"):
        obd_ext.saliency(w, torch.rand(3, 4, device=other))
