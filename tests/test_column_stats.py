"""obd_ext.ops.column_sq_sum_ (layer-wise OBD calibration statistics) against the reference."""

import pytest
import torch

from obd_ext import ops, reference
from testing import DTYPES, param_device, require_kernels

SHAPES = [(0, 5), (1, 1), (7, 3), (513, 257), (2, 300, 70), (3, 1, 600)]


@param_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(device, dtype, acc_dtype, shape):
    require_kernels(device)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * 3).to(dtype).to(device)
    start = torch.rand(shape[-1], generator=g, dtype=torch.float64).to(acc_dtype).to(device)
    acc = ops.column_sq_sum_(start.clone(), x)
    ref = start.double() + reference.column_sq_sum(x, torch.float64)
    rows = max(1, x.numel() // max(1, shape[-1]))
    tol = 1e-13 if acc_dtype == torch.float64 and dtype == torch.float64 else 2e-6 * rows ** 0.5
    torch.testing.assert_close(acc.double(), ref.to(device), rtol=tol, atol=0)
    assert acc.dtype == acc_dtype


@param_device
def test_reads_narrow_dtypes_exactly_and_accumulates(device):
    """float16/bfloat16 are widened exactly: the same sums as for their float32 copies, bit for bit."""
    require_kernels(device)
    x = torch.randn(1000, 37, device=device).bfloat16()
    a = ops.column_sq_sum_(torch.zeros(37, device=device), x)
    b = ops.column_sq_sum_(torch.zeros(37, device=device), x.float())
    assert torch.equal(a, b)
    both = ops.column_sq_sum_(ops.column_sq_sum_(torch.zeros(37, device=device), x[:500]), x[500:])
    torch.testing.assert_close(both, a, rtol=1e-6, atol=0)  # streaming over calibration batches


def test_non_contiguous_and_deterministic_across_threads():
    x = torch.randn(40, 3000, dtype=torch.float64).float()
    t = x.t()  # 3000 rows of 40 features, non-contiguous
    ref = ops.column_sq_sum_(torch.zeros(40), t.contiguous())
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(ops.column_sq_sum_(torch.zeros(40), t))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o, ref) for o in outs)


def test_errors_name_the_argument():
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="acc must be float32 or float64 .*got BFloat16"):
        ops.column_sq_sum_(torch.zeros(3, dtype=torch.bfloat16), x)
    with pytest.raises(RuntimeError, match=r"x must have 5 features in its last dimension .*got shape \[4, 3\]"):
        ops.column_sq_sum_(torch.zeros(5), x)
    with pytest.raises(RuntimeError, match="acc must be a contiguous 1-D tensor"):
        ops.column_sq_sum_(torch.zeros(3, 2)[:, 0], x)
    with pytest.raises(RuntimeError, match="x must be float32, float64, float16 or bfloat16, got Long"):
        ops.column_sq_sum_(torch.zeros(3), torch.ones(4, 3, dtype=torch.long))


def test_opcheck_and_compile():
    acc, x = torch.zeros(6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    torch.library.opcheck(torch.ops.obd_ext.column_sq_sum_.default, (acc, x))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def stats(a, v):
        ops.column_sq_sum_(a, v * 2)
        return a + 1

    out = stats(torch.zeros(6, dtype=torch.float64), x)
    torch.testing.assert_close(out, reference.column_sq_sum(x * 2, torch.float64) + 1)
