"""obd_ext.ops.squared_conv (the convolution rule's products) against the autograd reference."""

import pytest
import torch

from obd_ext import ops, reference
from testing import param_device, require_kernels

CASES = [  # (input shape, weight shape, stride, padding, dilation, transposed, output_padding, groups)
    ((2, 3, 9), (4, 3, 3), [1], [1], [1], False, [0], 1),
    ((2, 4, 7, 6), (6, 2, 3, 3), [2, 1], [1, 0], [1, 2], False, [0, 0], 2),
    ((1, 2, 5, 5, 4), (3, 2, 2, 2, 2), [1, 1, 1], [0, 1, 0], [1, 1, 1], False, [0, 0, 0], 1),
    ((2, 4, 5, 5), (4, 3, 3, 3), [2, 2], [1, 1], [1, 1], True, [1, 1], 1),
]


@param_device
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{len(c[0]) - 2}d{'T' if c[5] else ''}g{c[7]}")
@pytest.mark.parametrize("mask", [(True, True, True), (True, False, False), (False, True, False)], ids=str)
def test_matches_reference(device, case, mask):
    require_kernels(device)
    xs, ws, stride, padding, dilation, transposed, out_pad, groups = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*xs, generator=g, dtype=torch.float64).to(device)
    w = torch.randn(*ws, generator=g, dtype=torch.float64).to(device)
    y = reference.squared_conv(torch.zeros(0), x, w, None, stride, padding, dilation, transposed, out_pad, groups,
                               (False, False, False))  # shape only
    del y
    f = torch.nn.functional
    conv = (f.conv_transpose1d, f.conv_transpose2d, f.conv_transpose3d) if transposed else (f.conv1d, f.conv2d,
                                                                                             f.conv3d)
    out = (conv[x.dim() - 3](x, w, None, stride, padding, out_pad, groups, dilation) if transposed
           else conv[x.dim() - 3](x, w, None, stride, padding, dilation, groups))
    h = torch.rand(out.shape, generator=g, dtype=torch.float64).to(device)
    bias = [w.shape[1] * groups if transposed else w.shape[0]]
    got = ops.squared_conv(h, x, w, bias, stride, padding, dilation, transposed, out_pad, groups, list(mask))
    ref = reference.squared_conv(h, x, w, bias, stride, padding, dilation, transposed, out_pad, groups, mask)
    for a, b, wanted in zip(got, ref, mask):
        if wanted:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        else:
            assert a is None


def test_opcheck_and_errors():
    x, w = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64)
    h = torch.rand(2, 4, 4, 4, dtype=torch.float64)
    args = (h, x, w, [4], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, True])
    torch.library.opcheck(torch.ops.obd_ext.squared_conv.default, args)
    with pytest.raises(RuntimeError, match="h must be float32, float64, float16 or bfloat16, got Long"):
        ops.squared_conv(h.long(), *args[1:])
