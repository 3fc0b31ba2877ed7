"""Pure math on LoRA adapter tensors: merging heterogeneous ranks, editing, validating updates.

Also the pieces of federated optimisation that act on state dicts: robust rules (norm bounding,
median, trimmed mean, Krum, the rank-aware product rule), DP-FedAvg's clipping, noise and
accounting, server optimisers, SCAFFOLD control variates, FedNova's rescaling, and the sharing
policies that split a client's state, and streaming merges that take one client at a time.
Mappings of tensors plus ranks and weights in, new dicts out; inputs are never mutated. Depends
on torch (and dp-accounting, imported when epsilon is first computed): no Ray, no I/O, no
config objects.
"""

from aggregation.damped import DampedMerger, damped_merge
from aggregation.editing import EditResult, cosine_similarity, edit_layerwise
from aggregation.fedex import fedex_residual
from aggregation.fedilora import FediLoRAMerger, dimension_weights, fedilora_merge
from aggregation.fednova import fednova_rescale
from aggregation.flexlora import (
    SVD_CHOICES,
    FlexLoRAMerger,
    flexlora_merge,
    svd_factors,
    use_lowrank,
)
from aggregation.flora import FLoRAMerger, flora_delta, flora_stack
from aggregation.hetlora import (
    HetLoRAMerger,
    hetlora_merge,
    hetlora_tail_norm,
    hetlora_weights,
    product_norm,
)
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
from aggregation.lora_pairs import factor_product, lora_pairs, pair_products
from aggregation.merge import merge_lora_state_dicts
from aggregation.privacy import (
    adaptive_clip_update,
    clip_update,
    epsilon_after,
    noise_for_epsilon,
    update_noise_multiplier,
)
from aggregation.rank_merger import RankMerger
from aggregation.registry import MERGERS, get_merger, merger_class
from aggregation.robust import (
    clip_to_norm,
    coordinate_median,
    covered_statistic,
    krum_scores,
    multi_krum,
    product_distances,
    product_outliers,
    rank_bands,
    trimmed_mean,
    update_norms,
)
from aggregation.scaffold import scaffold_client_variate, scaffold_server_variate
from aggregation.scaling import fold_scaling, unfold_scaling
from aggregation.server_opt import (
    SERVER_OPTIMIZERS,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    ServerOptimizer,
    get_server_optimizer,
)
from aggregation.sharing import SHARING_POLICIES, join_state, shared_keys, split_state
from aggregation.streaming import InOrder, StreamingMerge, check_stream_inputs
from aggregation.validate import (
    MERGE_DTYPES,
    UpdateRejected,
    check_merge_inputs,
    check_merge_states,
    check_state_tensors,
    check_update,
)
from aggregation.zeropad import ZeroPadMerger, zeropad_merge

__all__ = [
    "update_noise_multiplier",
    "noise_for_epsilon",
    "epsilon_after",
    "clip_update",
    "adaptive_clip_update",
    "MERGERS",
    "MERGE_DTYPES",
    "SERVER_OPTIMIZERS",
    "SHARING_POLICIES",
    "SVD_CHOICES",
    "EditResult",
    "FLoRAMerger",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedYogi",
    "FediLoRAMerger",
    "DampedMerger",
    "damped_merge",
    "FlexLoRAMerger",
    "HetLoRAMerger",
    "InOrder",
    "RankMerger",
    "ServerOptimizer",
    "StreamingMerge",
    "UpdateRejected",
    "ZeroPadMerger",
    "check_merge_inputs",
    "check_merge_states",
    "check_stream_inputs",
    "check_state_tensors",
    "check_update",
    "clip_to_norm",
    "coordinate_median",
    "covered_statistic",
    "cosine_similarity",
    "default_global_rank",
    "dimension_weights",
    "edit_layerwise",
    "factor_product",
    "fedex_residual",
    "fedilora_merge",
    "fednova_rescale",
    "flexlora_merge",
    "flora_delta",
    "flora_stack",
    "fold_scaling",
    "get_merger",
    "get_server_optimizer",
    "hetlora_merge",
    "hetlora_tail_norm",
    "hetlora_weights",
    "is_lora",
    "is_lora_a",
    "is_lora_b",
    "join_state",
    "krum_scores",
    "lora_pairs",
    "lora_rank",
    "merge_lora_state_dicts",
    "merger_class",
    "multi_krum",
    "pad",
    "pair_products",
    "product_norm",
    "rank_axis",
    "scaffold_client_variate",
    "scaffold_server_variate",
    "shared_keys",
    "split_state",
    "svd_factors",
    "trimmed_mean",
    "product_distances",
    "product_outliers",
    "rank_bands",
    "truncate",
    "unfold_scaling",
    "update_norms",
    "use_lowrank",
    "zeropad_merge",
]
