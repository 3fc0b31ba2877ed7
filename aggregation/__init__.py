"""Pure math on LoRA adapter tensors: merging heterogeneous ranks, editing, validating updates.

Also the pieces of federated optimisation that act on state dicts: robust rules (norm bounding,
median, trimmed mean, Krum, the rank-aware product rule), DP-FedAvg's clipping, noise and
accounting, server optimisers, SCAFFOLD control variates, FedNova's rescaling, and the sharing
policies that split a client's state, and streaming merges that take one client at a time.
Mappings of tensors plus ranks and weights in, new dicts out; inputs are never mutated. Depends
on torch (and dp-accounting, imported when epsilon is first computed): no Ray, no I/O, no
config objects.

The names below load lazily (PEP 562): importing :mod:`aggregation` or its torch-free
:mod:`aggregation.registry` costs no torch import; a name's module is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "DampedMerger": "aggregation.damped",
    "damped_merge": "aggregation.damped",
    "EditResult": "aggregation.editing",
    "cosine_similarity": "aggregation.editing",
    "edit_layerwise": "aggregation.editing",
    "fedex_residual": "aggregation.fedex",
    "FediLoRAMerger": "aggregation.fedilora",
    "dimension_weights": "aggregation.fedilora",
    "fedilora_merge": "aggregation.fedilora",
    "fednova_rescale": "aggregation.fednova",
    "FlexLoRAMerger": "aggregation.flexlora",
    "SVD_CHOICES": "aggregation.flexlora",
    "flexlora_merge": "aggregation.flexlora",
    "svd_factors": "aggregation.flexlora",
    "use_lowrank": "aggregation.flexlora",
    "FLoRAMerger": "aggregation.flora",
    "flora_delta": "aggregation.flora",
    "flora_stack": "aggregation.flora",
    "HetLoRAMerger": "aggregation.hetlora",
    "hetlora_merge": "aggregation.hetlora",
    "hetlora_tail_norm": "aggregation.hetlora",
    "hetlora_weights": "aggregation.hetlora",
    "product_norm": "aggregation.hetlora",
    "default_global_rank": "aggregation.lora_keys",
    "is_lora": "aggregation.lora_keys",
    "is_lora_a": "aggregation.lora_keys",
    "is_lora_b": "aggregation.lora_keys",
    "lora_rank": "aggregation.lora_keys",
    "pad": "aggregation.lora_keys",
    "rank_axis": "aggregation.lora_keys",
    "truncate": "aggregation.lora_keys",
    "factor_product": "aggregation.pairs",
    "lora_pairs": "aggregation.pairs",
    "pair_products": "aggregation.pairs",
    "merge_lora_state_dicts": "aggregation.merge",
    "RaFLoRAMerger": "aggregation.raflora",
    "raflora_merge": "aggregation.raflora",
    "raflora_products": "aggregation.raflora",
    "rank_partition_weights": "aggregation.raflora",
    "rank_partitions": "aggregation.raflora",
    "adaptive_clip_update": "aggregation.privacy",
    "clip_update": "aggregation.privacy",
    "epsilon_after": "aggregation.privacy",
    "noise_for_epsilon": "aggregation.privacy",
    "update_noise_multiplier": "aggregation.privacy",
    "RankMerger": "aggregation.rank_merger",
    "MERGERS": "aggregation.registry",
    "SERVER_OPTIMIZERS": "aggregation.registry",
    "SHARING_POLICIES": "aggregation.registry",
    "get_merger": "aggregation.registry",
    "get_server_optimizer": "aggregation.registry",
    "merger_class": "aggregation.registry",
    "server_optimizer_class": "aggregation.registry",
    "clip_to_norm": "aggregation.robust",
    "coordinate_median": "aggregation.robust",
    "covered_statistic": "aggregation.robust",
    "krum_scores": "aggregation.robust",
    "multi_krum": "aggregation.robust",
    "product_distances": "aggregation.robust",
    "product_outliers": "aggregation.robust",
    "rank_bands": "aggregation.robust",
    "trimmed_mean": "aggregation.robust",
    "update_norms": "aggregation.robust",
    "scaffold_client_variate": "aggregation.scaffold",
    "scaffold_server_variate": "aggregation.scaffold",
    "fold_scaling": "aggregation.scaling",
    "unfold_scaling": "aggregation.scaling",
    "FedAdagrad": "aggregation.server_opt",
    "FedAdam": "aggregation.server_opt",
    "FedAvg": "aggregation.server_opt",
    "FedAvgM": "aggregation.server_opt",
    "FedYogi": "aggregation.server_opt",
    "ServerOptimizer": "aggregation.server_opt",
    "join_state": "aggregation.sharing",
    "shared_keys": "aggregation.sharing",
    "split_state": "aggregation.sharing",
    "InOrder": "aggregation.streaming",
    "StreamingMerge": "aggregation.streaming",
    "check_stream_inputs": "aggregation.streaming",
    "MERGE_DTYPES": "aggregation.validate",
    "UpdateRejected": "aggregation.validate",
    "check_client_arguments": "aggregation.validate",
    "check_merge_arguments": "aggregation.validate",
    "check_merge_inputs": "aggregation.validate",
    "check_merge_states": "aggregation.validate",
    "check_state_tensors": "aggregation.validate",
    "check_update": "aggregation.validate",
    "ZeroPadMerger": "aggregation.zeropad",
    "zeropad_merge": "aggregation.zeropad",
}

__all__ = [
    "DampedMerger",
    "EditResult",
    "FLoRAMerger",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedYogi",
    "FediLoRAMerger",
    "FlexLoRAMerger",
    "HetLoRAMerger",
    "InOrder",
    "MERGERS",
    "MERGE_DTYPES",
    "RaFLoRAMerger",
    "RankMerger",
    "SERVER_OPTIMIZERS",
    "SHARING_POLICIES",
    "SVD_CHOICES",
    "ServerOptimizer",
    "StreamingMerge",
    "UpdateRejected",
    "ZeroPadMerger",
    "adaptive_clip_update",
    "check_client_arguments",
    "check_merge_arguments",
    "check_merge_inputs",
    "check_merge_states",
    "check_state_tensors",
    "check_stream_inputs",
    "check_update",
    "clip_to_norm",
    "clip_update",
    "coordinate_median",
    "cosine_similarity",
    "covered_statistic",
    "damped_merge",
    "default_global_rank",
    "dimension_weights",
    "edit_layerwise",
    "epsilon_after",
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
    "noise_for_epsilon",
    "pad",
    "pair_products",
    "product_distances",
    "product_norm",
    "product_outliers",
    "raflora_merge",
    "raflora_products",
    "rank_axis",
    "rank_bands",
    "rank_partition_weights",
    "rank_partitions",
    "scaffold_client_variate",
    "scaffold_server_variate",
    "server_optimizer_class",
    "shared_keys",
    "split_state",
    "svd_factors",
    "trimmed_mean",
    "truncate",
    "unfold_scaling",
    "update_noise_multiplier",
    "update_norms",
    "use_lowrank",
    "zeropad_merge",
]

if TYPE_CHECKING:  # what a type checker and an IDE see
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
    from aggregation.merge import merge_lora_state_dicts
    from aggregation.pairs import factor_product, lora_pairs, pair_products
    from aggregation.privacy import (
        adaptive_clip_update,
        clip_update,
        epsilon_after,
        noise_for_epsilon,
        update_noise_multiplier,
    )
    from aggregation.raflora import (
        RaFLoRAMerger,
        raflora_merge,
        raflora_products,
        rank_partition_weights,
        rank_partitions,
    )
    from aggregation.rank_merger import RankMerger
    from aggregation.registry import (
        MERGERS,
        SERVER_OPTIMIZERS,
        SHARING_POLICIES,
        get_merger,
        get_server_optimizer,
        merger_class,
        server_optimizer_class,
    )
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
        FedAdagrad,
        FedAdam,
        FedAvg,
        FedAvgM,
        FedYogi,
        ServerOptimizer,
    )
    from aggregation.sharing import join_state, shared_keys, split_state
    from aggregation.streaming import InOrder, StreamingMerge, check_stream_inputs
    from aggregation.validate import (
        MERGE_DTYPES,
        UpdateRejected,
        check_client_arguments,
        check_merge_arguments,
        check_merge_inputs,
        check_merge_states,
        check_state_tensors,
        check_update,
    )
    from aggregation.zeropad import ZeroPadMerger, zeropad_merge


# No exported name may equal a submodule's name: importing ``aggregation.X`` sets the package's
# attribute ``X`` to that module, which would hide a function of the same name (a test checks).
def __getattr__(name: str) -> Any:
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'aggregation' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
