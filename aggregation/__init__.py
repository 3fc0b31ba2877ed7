"""Pure math on LoRA adapter tensors: merging heterogeneous ranks, editing, validating updates.

Mappings of tensors plus ranks and weights in, new dicts out; inputs are never mutated. Depends
on torch only: no Ray, no I/O, no config objects.
"""

from aggregation.editing import EditResult, cosine_similarity, edit_layerwise
from aggregation.fedilora import dimension_weights, fedilora_merge
from aggregation.lora_keys import (
    default_global_rank,
    is_lora,
    is_lora_a,
    is_lora_b,
    lora_rank,
    pad,
    rank_axis,
    truncate,
)
from aggregation.merge import merge_lora_state_dicts
from aggregation.registry import (
    MERGERS,
    FediLoRAMerger,
    RankMerger,
    ZeroPadMerger,
    get_merger,
    merger_class,
)
from aggregation.scaling import fold_scaling, unfold_scaling
from aggregation.validate import UpdateRejected, check_merge_inputs, check_update
from aggregation.zeropad import zeropad_merge

__all__ = [
    "MERGERS",
    "EditResult",
    "FediLoRAMerger",
    "RankMerger",
    "UpdateRejected",
    "ZeroPadMerger",
    "check_merge_inputs",
    "check_update",
    "cosine_similarity",
    "default_global_rank",
    "dimension_weights",
    "edit_layerwise",
    "fedilora_merge",
    "fold_scaling",
    "get_merger",
    "is_lora",
    "is_lora_a",
    "is_lora_b",
    "lora_rank",
    "merge_lora_state_dicts",
    "merger_class",
    "pad",
    "rank_axis",
    "truncate",
    "unfold_scaling",
    "zeropad_merge",
]
