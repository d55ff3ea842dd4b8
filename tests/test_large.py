"""A pool of more than 2^31 entries (slow: about 7 GB; run with `pytest -m slow`).

The scores are integers 0..250 laid out periodically, so the exact answer is
known in closed form: every score below the threshold value is deleted, none
above it, and of the entries equal to it exactly the first r in (tensor, flat
index) order, where the r-th lies beyond flat index 2^31.
"""

import pytest
import torch

from obd_ext import ops
from testing import DEVICES, require_kernels

PERIOD = 251
VALUE = 100  # the tied threshold value


def count_below(n: int, v: int) -> int:
    """Entries of arange(n) % PERIOD that are < v."""
    full, rest = divmod(n, PERIOD)
    return full * v + min(rest, v)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cap", [None, "0"])
def test_pool_beyond_2_pow_31(device, cap, monkeypatch):
    require_kernels(device)
    if cap is not None:
        monkeypatch.setenv("OBD_EXT_CANDIDATE_CAP", cap)
    n_big = 2 ** 31 + 2 ** 20 + 7
    small = torch.full((1000,), float(VALUE), device=device)  # tensor 0: all tied, taken first
    big = torch.empty(n_big, dtype=torch.bfloat16, device=device)
    step = 2 ** 27
    for s in range(0, n_big, step):  # fill in slices: no int64 temp of 2^31 entries
        e = min(n_big, s + step)
        big[s:e] = (torch.arange(s, e, device=device) % PERIOD).to(torch.bfloat16)
    masks = [torch.ones(1000, dtype=torch.bool, device=device), torch.ones(n_big, dtype=torch.bool, device=device)]
    below = count_below(n_big, VALUE)
    ties_big = count_below(n_big, VALUE + 1) - below
    r_big = ties_big - 3  # leave the last three occurrences of VALUE kept
    k = below + 1000 + r_big
    stats = ops.global_select_([], [small, big], masks, k, None, False)
    assert int(stats[0]) == k
    assert not masks[0].any()  # tensor 0's ties come first
    # Closed-form check, slice by slice.
    deleted_ties = 0
    last_deleted_tie = -1
    first_kept_tie = None
    for s in range(0, n_big, step):
        e = min(n_big, s + step)
        vals = torch.arange(s, e, device=device) % PERIOD
        kept = masks[1][s:e]
        assert bool((~kept[vals < VALUE]).all()), "a score below the threshold was kept"
        assert bool(kept[vals > VALUE].all()), "a score above the threshold was deleted"
        tie_pos = (vals == VALUE).nonzero().reshape(-1)
        tie_kept = kept[tie_pos]
        deleted_ties += int((~tie_kept).sum())
        if (~tie_kept).any():
            last_deleted_tie = s + int(tie_pos[~tie_kept].max())
        if first_kept_tie is None and tie_kept.any():
            first_kept_tie = s + int(tie_pos[tie_kept].min())
    assert deleted_ties == r_big
    assert last_deleted_tie > 2 ** 31 and first_kept_tie > last_deleted_tie  # ties in index order
