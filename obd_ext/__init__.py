"""obd_ext: Optimal Brain Damage for PyTorch.

Second-order saliency ``s = h w^2 / 2`` and exact, fused selection of the
lowest-saliency weights over a whole model, with CPU and CUDA kernels
registered under ``torch.ops.obd_ext``.
"""

import torch  # noqa: F401  (must load before _C: it links against libtorch)

from . import _C  # noqa: F401  loads the kernels and registers torch.ops.obd_ext
from . import constants, ops, vocabulary
from ._version import __version__
from .curvature import Curvature, CurvatureAccumulator, UnsupportedOpError, hessian_diag
from .pruning import OBDUnstructured, Pruner, default_prunable
from .sparse_export import Finalized, check_nm_pattern
from . import distributed, layerwise
from . import checkpoints
from .scheduler import OBDScheduler, cubic, fixed, one_shot
from .vocabulary import METHODS, check_pattern_sparsity, parse_pattern
from .ops import group_saliency, saliency
from .selection import (
    SCOPES,
    Selection,
    check_sparsity,
    count_for_sparsity,
    prune_,
    prune_global_,
    prune_groups_,
    prune_layers_,
    prune_nm_,
    prune_rows_,
    select_global,
    select_scores,
)

__all__ = [
    "__version__",
    "ops",
    "constants",
    "vocabulary",
    "checkpoints",
    "parse_pattern",
    "check_pattern_sparsity",
    "saliency",
    "group_saliency",
    "SCOPES",
    "Selection",
    "check_sparsity",
    "count_for_sparsity",
    "prune_",
    "prune_global_",
    "prune_groups_",
    "prune_layers_",
    "prune_nm_",
    "prune_rows_",
    "select_global",
    "select_scores",
    "has_cuda_kernels",
    "METHODS",
    "Curvature",
    "CurvatureAccumulator",
    "UnsupportedOpError",
    "hessian_diag",
    "Pruner",
    "default_prunable",
    "OBDUnstructured",
    "Finalized",
    "distributed",
    "layerwise",
    "check_nm_pattern",
    "OBDScheduler",
    "one_shot",
    "fixed",
    "cubic",
]


def has_cuda_kernels() -> bool:
    """Whether this build of obd_ext registered CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("obd_ext::saliency", "CUDA")
