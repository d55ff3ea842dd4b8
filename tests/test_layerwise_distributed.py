"""Layer-wise OBD and OBS with data-parallel calibration on real gloo process groups.

Two ranks each get half of the calibration batches; the statistics are
all-reduced before every block, so both ranks must prune to the masks that one
process gets from all the batches.
"""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from obd_ext.layerwise import prune_layerwise
from obd_ext.models import GPT

METHODS = ("layerwise-obd", "layerwise-obs")  # diagonal statistics, and the full X^T X (shared q/k/v matrices)


def _model():
    torch.manual_seed(0)
    return GPT(vocab=61, d=32, layers=2, heads=4, seq=16, tied=True).eval()


def _batches():
    return [torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mine = _batches()[rank::world]
        for method in METHODS:
            model = _model()
            prune_layerwise(model, mine, sparsity=0.5, method=method, process_group=True, progress=False)
            torch.save({n: p.detach() for n, p in model.named_parameters()},
                       os.path.join(out_dir, f"{method}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_prune_like_one_process_on_all_the_data():
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True,
                           start_method="spawn")
        for method in METHODS:
            single = _model()
            prune_layerwise(single, _batches(), sparsity=0.5, method=method, progress=False)
            expected = {n: p.detach() for n, p in single.named_parameters()}
            for rank in range(2):
                got = torch.load(os.path.join(tmp, f"{method}-rank{rank}.pt"))
                for n, p in expected.items():
                    assert torch.equal((got[n] == 0), (p == 0)), (method, rank, n)
                    torch.testing.assert_close(got[n], p, rtol=1e-5, atol=1e-6)
