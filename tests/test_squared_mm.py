"""obd_ext.ops.squared_mm (the linear rule's product) against the reference and the square-on-load loop."""

import pytest
import torch

from obd_ext import ops, reference
from testing import DTYPES, param_device, require_kernels

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@param_device
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shapes", [((5, 7), (7, 3)), ((0, 4), (4, 2)), ((3, 1), (1, 6)), ((2, 4, 5), (2, 5, 3)),
                                    ((33, 70), (70, 513)), ((130, 33), (33, 200)), ((3, 65, 17), (3, 17, 66))],
                         ids=str)  # the last two span several 64 x 64 tiles of the CUDA kernel, with ragged edges
@pytest.mark.parametrize("sq", [(True, False), (False, True), (True, True), (False, False)], ids=str)
def test_matches_reference(device, dtype, shapes, sq):
    require_kernels(device)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(*shapes[0], generator=g, dtype=torch.float64).to(dtype).to(device)
    b = torch.randn(*shapes[1], generator=g, dtype=torch.float64).to(dtype).to(device)
    out = ops.squared_mm(a, b, *sq)
    ref = reference.squared_mm(a.double(), b.double(), *sq).to(dtype)
    torch.testing.assert_close(out, ref, rtol=TOL[dtype], atol=TOL[dtype] * max(1, shapes[0][-1]))
    strided = ops.squared_mm(a.transpose(-1, -2).contiguous().transpose(-1, -2), b, *sq)  # non-contiguous a
    torch.testing.assert_close(strided, out, rtol=TOL[dtype], atol=TOL[dtype] * max(1, shapes[0][-1]))
    if a.dim() == 2 or device == "cuda":  # the square-on-load kernel agrees (CUDA: batched and strided too)
        direct = torch.ops.obd_ext._squared_mm_direct(a, b, *sq)
        torch.testing.assert_close(direct, ref, rtol=TOL[dtype], atol=TOL[dtype] * max(1, shapes[0][-1]))
        if device == "cuda":
            at = a.transpose(-1, -2).contiguous().transpose(-1, -2)
            direct_t = torch.ops.obd_ext._squared_mm_direct(at, b.transpose(-1, -2).contiguous().transpose(-1, -2), *sq)
            torch.testing.assert_close(direct_t, direct, rtol=TOL[dtype], atol=TOL[dtype] * max(1, shapes[0][-1]))


def test_opcheck_and_errors():
    a, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.obd_ext.squared_mm.default, (a, b, True, False))
    with pytest.raises(RuntimeError, match=r"shapes \[4, 5\] and \[4, 5\] cannot be multiplied"):
        ops.squared_mm(a, a, True, False)
    with pytest.raises(RuntimeError, match="a and b must have one dtype"):
        ops.squared_mm(a, b.float(), True, False)
    with pytest.raises(RuntimeError, match="must both be 2-D or both 3-D"):
        ops.squared_mm(a, b[0], True, False)
