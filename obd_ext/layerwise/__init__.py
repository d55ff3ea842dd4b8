"""Layer-wise OBD for large models (EQUATIONS.md, "Layer-wise form").

- :mod:`.stats`: calibration statistics ``sum_n x_nj^2`` per input feature;
- :mod:`.blockwise`: pruning one transformer block at a time;
- :mod:`.hf`: Hugging Face transformers models from a local directory
  (``obd-ext prune-llm``).
"""

from .blockwise import (LAYERWISE_CRITERIA, LAYERWISE_SCOPES, LayerReport, LayerwiseResult, find_blocks,
                        parse_pattern, prune_by_saliency_, prune_layerwise)
from .stats import CalibrationStats, prunable_layers, weight_rows

__all__ = ["CalibrationStats", "prunable_layers", "weight_rows", "LAYERWISE_SCOPES", "LAYERWISE_CRITERIA",
           "LayerReport", "LayerwiseResult", "find_blocks", "parse_pattern", "prune_by_saliency_", "prune_layerwise"]
