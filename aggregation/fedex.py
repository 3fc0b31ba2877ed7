"""FedEx-LoRA's residual (docs/algorithms.md §1.7, Singhal et al., arXiv 2410.09432).

Averaging LoRA factors loses the cross terms of the products: ``B_g @ A_g`` is not
``sum_i p_i B_i @ A_i``. FedEx-LoRA folds the difference into every client's frozen base weight,
``W_0 <- W_0 + (sum_i p_i B_i @ A_i - B_g @ A_g)``, so that ``W_0 + B_g @ A_g`` is the exact
average of the clients' adapted weights. Everything is in the "s = 1" space (each ``B`` already
carries its LoRA scaling, see ``aggregation.scaling``), so the residual is added to ``W_0`` as is.
The residual is exact for whichever merge produced ``B_g, A_g`` (zero-padding, FediLoRA, HetLoRA,
FlexLoRA's SVD); a client that is handed back only the first ``r_i`` dimensions of the global
adapter sees ``W_0 + B_g[:, :r_i] @ A_g[:r_i]``, which the residual does not correct.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from aggregation.lora_keys import lora_rank
from aggregation.pairs import delta_shape, factor_product, lora_pairs, stack_factors
from aggregation.stacking import accumulation_dtype, sample_weights
from aggregation.validate import check_merge_inputs


def _merged_rank(merged: Mapping[str, Tensor]) -> int:
    try:
        return lora_rank(merged)
    except ValueError as error:
        raise ValueError(f"merged state: {error}") from error


def _merged_factors(
    merged: Mapping[str, Tensor], prefix: str, a_key: str, b_key: str, a: Tensor, b: Tensor
) -> tuple[Tensor, Tensor]:
    """Return the merged ``(A_g, B_g)`` of one module, checked against client 0's ``a, b``."""
    missing = [key for key in (a_key, b_key) if key not in merged]
    if missing:
        raise ValueError(f"merged state lacks module {prefix!r} that the clients have: {missing}")
    a_g, b_g = merged[a_key], merged[b_key]
    rank = int(a_g.shape[0])
    expected = {a_key: (rank, *a.shape[1:]), b_key: (int(b.shape[0]), rank, *b.shape[2:])}
    for key, tensor in ((a_key, a_g), (b_key, b_g)):
        if tuple(tensor.shape) != expected[key]:
            raise ValueError(
                f"{key}: merged shape {tuple(tensor.shape)} does not fit the clients' "
                f"(expected {expected[key]} at the merged rank {rank})"
            )
    return a_g, b_g


def fedex_residual(
    states: Sequence[Mapping[str, Tensor]],
    ranks: Sequence[int],
    num_samples: Sequence[float],
    merged: Mapping[str, Tensor],
) -> dict[str, Tensor]:
    """Return each module's ``sum_i p_i B_i @ A_i - B_g @ A_g``, to add to its base weight.

    ``p_i = n_i / sum n``. Products are formed in float32 (float64 if any factor is) and cast
    back to the clients' ``lora_A`` dtype.

    Args:
        states: The clients' LoRA state dicts (same keys, "s = 1" space), client ``i`` at rank
            ``ranks[i]``; dense keys are ignored.
        ranks: Each client's rank.
        num_samples: Each client's number of training samples.
        merged: The global state merged from ``states`` at any rank ``R >= max(ranks)``; its
            dense keys and any module the clients lack are ignored.

    Returns:
        A new dict keyed like ``flora_delta``'s: module prefix (the ``lora_A`` key minus
        ``lora_A.weight``) -> residual shaped like the base weight, ``(d, k)`` or
        ``(d, k, 1, 1)``.

    Raises:
        ValueError: If the client inputs are inconsistent or a client's rank exceeds ``R`` (see
            ``check_merge_inputs``); a factor has no partner; ``merged`` has no consistent
            rank, lacks a module the clients have, or has a factor whose shape does not fit the
            clients' at rank ``R``.
    """
    global_rank = _merged_rank(merged)
    check_merge_inputs(states, ranks, num_samples, global_rank)
    weights = sample_weights(num_samples)
    residuals: dict[str, Tensor] = {}
    for prefix, (a_key, b_key) in lora_pairs(states[0]).items():
        a_tensors = [state[a_key] for state in states]
        b_tensors = [state[b_key] for state in states]
        a_g, b_g = _merged_factors(merged, prefix, a_key, b_key, a_tensors[0], b_tensors[0])
        dtype = accumulation_dtype([*a_tensors, *b_tensors, a_g, b_g])
        b_cat, a_cat = stack_factors(a_tensors, b_tensors, weights, dtype)  # (d, Σr), (Σr, k')
        exact = (b_cat @ a_cat).reshape(delta_shape(a_tensors[0], b_tensors[0]))
        residual = exact - factor_product(a_g, b_g, dtype)
        residuals[prefix] = residual.to(a_tensors[0].dtype)
    return residuals
