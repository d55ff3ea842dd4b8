"""Global OBD pruning on several processes: curvature from every rank's data, selection over flat shards.

Each rank computes the curvature of a small MLP on its own shard of the data,
the curvatures are all-reduced (one collective per dtype), the parameters are
split FSDP-style into flat shards (rank r owns a contiguous slice of all the
parameters flattened and concatenated), and ``prune_global_sharded_`` deletes
the lowest saliencies of the whole model while only histograms cross the
wire. Every rank then checks its slice against single-process
``obd_ext.prune_global_`` on the whole model: bitwise the same.

With FSDP, pass the local shards of the flat parameters (and of their
curvatures) instead of ``shard_flat`` views.

Run (gloo on CPU, NCCL when CUDA is available):

    torchrun --standalone --nproc_per_node=2 examples/distributed_prune.py [--sparsity 0.8]
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn as nn

import obd_ext
from obd_ext.distributed import all_reduce_curvature, prune_global_sharded_, shard_flat


def make_data(rank: int, world: int, batches: int = 8, batch: int = 32):
    """A synthetic regression task; rank r gets batches r, r + world, ..."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(16, 4, generator=g)
    data = []
    for _ in range(batches):
        x = torch.randn(batch, 16, generator=g)
        data.append((x, torch.tanh(x @ teacher)))
    return data[rank::world]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.8)
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)  # the same initial model on every rank
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(device)
    data = [(x.to(device), y.to(device)) for x, y in make_data(rank, world)]

    # 1. Curvature of the whole data: per-rank sums, all-reduced.
    curv = obd_ext.hessian_diag(model, nn.MSELoss(), data, method="lm", reduction="sum", progress=False)
    all_reduce_curvature(curv)

    # 2. Flat shards: this rank's slice of the parameters, curvatures and masks.
    names = [n for n, _ in model.named_parameters()]
    params = [p.data for p in model.parameters()]
    full_masks = [torch.ones_like(p, dtype=torch.bool) for p in params]
    reference = [p.clone() for p in params], [m.clone() for m in full_masks]
    weights = shard_flat(params, rank, world)
    curvatures = shard_flat([curv[n] for n in names], rank, world, allow_copies=True)  # read-only
    masks = shard_flat(full_masks, rank, world)

    # 3. Global selection over all ranks' shards. Each rank writes only its own slice (with FSDP
    # that is all it holds; in this replicated toy model the other slices stay as they were here).
    sel = prune_global_sharded_(weights, curvatures, sparsity=args.sparsity, masks=masks)
    local_kept = sum(int(m.sum()) for m in masks)
    local_n = sum(m.numel() for m in masks)
    print(f"rank {rank}/{world}: owns {local_n} of {sel.numel} entries, deleted {sel.local.deleted_now} here "
          f"(local sparsity {1 - local_kept / max(local_n, 1):.3f}); global sparsity {sel.sparsity:.3f}, "
          f"predicted loss increase {sel.predicted_increase:.4g}", flush=True)

    # 4. Check: single-process pruning of the whole model gives the same slice, bit for bit.
    ref_w, ref_m = reference
    ref = obd_ext.prune_global_(ref_w, [curv[n] for n in names], sparsity=args.sparsity, masks=ref_m)
    same = all(torch.equal(a, b) for a, b in zip(masks, shard_flat(ref_m, rank, world))) and all(
        torch.equal(a, b) for a, b in zip(weights, shard_flat(ref_w, rank, world)))
    assert same and sel.deleted_now == ref.deleted_now, f"rank {rank}: sharded selection differs"
    if rank == 0:
        print(f"global sparsity {sel.sparsity:.3f} (asked {args.sparsity}); every rank matches prune_global_")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
