"""Layer-wise OBD for large models (docs/math.md, "Layer-wise form for large models").

- :mod:`.stats`: calibration statistics ``sum_n x_nj^2`` per input feature,
  or the full ``X^T X`` (:class:`GramStats`);
- :mod:`.surgeon`: the layer-wise Optimal Brain Surgeon step (SparseGPT's
  blocked column sweep, ``method="layerwise-obs"``);
- :mod:`.blockwise`: pruning (and evaluating) one transformer block at a time;
- :mod:`.hf`: Hugging Face transformers models from a local directory
  (``obd-ext prune-llm``).

The method, scope and pattern names are those of :mod:`obd_ext.vocabulary`
(``LAYERWISE_METHODS``, ``LAYERWISE_SCOPES``, ``parse_pattern``).
"""

from .blockwise import (DEFAULT_SPARSITY, LayerReport, LayerwiseResult, block_hidden_states, capture_block_inputs,
                        find_blocks, forward_blockwise, next_block_inputs, prune_by_saliency_, prune_layerwise,
                        resolve_scope, resolve_sparsity)
from .stats import CalibrationStats, GramStats, prunable_layers, weight_rows
from .surgeon import SurgeonResult, obs_prune_

__all__ = ["CalibrationStats", "GramStats", "SurgeonResult", "obs_prune_", "prunable_layers", "weight_rows",
           "DEFAULT_SPARSITY", "LayerReport", "LayerwiseResult",
           "block_hidden_states", "capture_block_inputs", "find_blocks", "forward_blockwise", "next_block_inputs",
           "prune_by_saliency_", "prune_layerwise", "resolve_scope", "resolve_sparsity"]
