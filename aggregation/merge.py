"""One-call merge of heterogeneous-rank LoRA state dicts, folding per-client scaling first."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from aggregation.registry import get_merger, merger_class
from aggregation.scaling import fold_scaling


def merge_lora_state_dicts(
    states: Sequence[Mapping[str, Tensor]],
    ranks: Sequence[int],
    num_samples: Sequence[int],
    *,
    method: str = "fedilora",
    previous: Mapping[str, Tensor] | None = None,
    global_rank: int | None = None,
    scalings: Sequence[float] | None = None,
    empty_dim: str = "keep",
    svd: str = "auto",
) -> dict[str, Tensor]:
    """Merge clients' LoRA adapters of different ranks into one global adapter.

    When ``scalings`` are given (peft's per-client ``s_i = alpha_i / r_i``), each client's
    ``lora_B`` is multiplied by ``s_i`` before merging, so the result is in the "s = 1" space:
    it means ``dW = B_g @ A_g``, and ``previous`` must be in that space too. Hand it back to
    client ``i`` with ``unfold_scaling(redistributed, s_i)``. Without ``scalings`` the states
    are merged as given, which is right when every client uses the same constant scaling.

    Args:
        states: The sampled clients' LoRA state dicts (peft keys, same key set).
        ranks: Each client's LoRA rank; must match its tensors.
        num_samples: Each client's number of training samples (positive).
        method: A merge method registered in ``MERGERS`` (``"fedilora"``, ``"zeropad"``,
            ``"hetlora"``, ``"flexlora"``, ``"flora"``).
        previous: The previous global adapter (used by FediLoRA for uncovered dimensions).
        global_rank: The global rank ``R``; defaults to ``max(ranks)``, or the rank of
            ``previous`` if larger. Methods without a fixed rank (FLoRA, whose global rank is
            ``sum(ranks)``) ignore it and ``previous``.
        scalings: Optional per-client peft scaling ``s_i``, folded into ``lora_B``.
        empty_dim: FediLoRA's rule for a dimension no client covers: ``"keep"`` its previous
            value or ``"zero"`` it; ignored by methods that take no such option.
        svd: FlexLoRA's factorisation, ``"exact"``, ``"lowrank"`` or ``"auto"``; ignored by
            methods that take no such option.

    Returns:
        A new rank-``R`` global state dict; each tensor keeps the dtype of the clients' tensor.

    Raises:
        ValueError: If ``method`` is unknown (valid names are listed), ``scalings`` has the
            wrong length or holds a zero or non-finite value, ``empty_dim`` or ``svd`` is
            invalid, or the inputs are inconsistent (see ``RankMerger.merge``).
    """
    cls = merger_class(method)
    given = {"empty_dim": empty_dim, "svd": svd}
    options = {name: value for name, value in given.items() if name in cls.options}
    merger = get_merger(method, **options)
    if scalings is not None:
        if len(scalings) != len(states):
            raise ValueError(f"got {len(scalings)} scalings for {len(states)} states")
        states = [
            fold_scaling(state, scaling) for state, scaling in zip(states, scalings, strict=True)
        ]
    return merger.merge(states, ranks, num_samples, previous=previous, global_rank=global_rank)
