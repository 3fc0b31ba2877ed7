"""FediLoRA layer-wise model editing (docs/algorithms.md §1.3): pull stray local tensors toward
global.

After local training, each LoRA tensor's cosine similarity with the (truncated) previous global
tensor is measured; among the candidate tensors the ``count`` least similar ones whose cosine is
below ``threshold`` are replaced by a mix of global and local values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from aggregation.lora_keys import is_lora, is_lora_a, is_lora_b

EditKey = Literal["lora_A", "lora_B", "all"]
EditMode = Literal["weighted", "replace", "half"]
EDIT_KEY_CHOICES: tuple[str, ...] = get_args(EditKey)
EDIT_MODE_CHOICES: tuple[str, ...] = get_args(EditMode)

_CANDIDATE: dict[str, Callable[[str], bool]] = {
    "lora_A": is_lora_a,
    "lora_B": is_lora_b,
    "all": is_lora,
}

# Weight ``c`` of the local tensor in ``(1 - c) * global + c * local``, given the cosine.
# "weighted" clamps at 0 so that a negative cosine cannot push past the global value.
_LOCAL_WEIGHT: dict[str, Callable[[float], float]] = {
    "weighted": lambda similarity: min(max(similarity, 0.0), 1.0),
    "replace": lambda similarity: 0.0,
    "half": lambda similarity: 0.5,
}


@dataclass(frozen=True)
class EditResult:
    """The outcome of one client's layer-wise edit.

    Attributes:
        state: The edited adapter (a new dict of new tensors): the client's personalised model
            and its upload.
        edited: Keys of the tensors that were edited, least similar first.
        similarities: Cosine similarity of every LoRA tensor with its global counterpart.
    """

    state: dict[str, Tensor]
    edited: tuple[str, ...]
    similarities: dict[str, float]


def cosine_similarity(local: Tensor, reference: Tensor) -> float:
    """Return the cosine of the angle between two flattened tensors, computed in float64.

    A zero tensor has no direction, so the cosine is undefined there; we define it as 1.0 when
    both are zero (they are equal, nothing to correct) and 0.0 when exactly one is zero (no
    agreement in direction, as for orthogonal tensors, so the tensor stays an edit candidate).

    Args:
        local: One tensor.
        reference: A tensor of the same shape.

    Returns:
        The cosine similarity, in ``[-1, 1]``.

    Raises:
        ValueError: If the shapes differ.
    """
    if local.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(local.shape)} vs {tuple(reference.shape)}")
    a = local.detach().reshape(-1).to(torch.float64)
    b = reference.detach().reshape(-1).to(torch.float64)
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    a_zero, b_zero = bool(norm_a == 0), bool(norm_b == 0)
    if a_zero and b_zero:
        return 1.0
    if a_zero or b_zero:
        return 0.0
    cosine = float(torch.dot(a, b) / (norm_a * norm_b))
    return min(max(cosine, -1.0), 1.0)  # rounding can leave |cos| a hair above 1


def edit_layerwise(
    local: Mapping[str, Tensor],
    global_truncated: Mapping[str, Tensor],
    *,
    key: EditKey = "lora_A",
    count: int = 1,
    threshold: float = 0.95,
    mode: EditMode = "weighted",
) -> EditResult:
    """Edit the ``count`` least global-aligned LoRA tensors of a locally trained adapter.

    For every LoRA tensor ``l``, ``s_l = cosine(local_l, global_l)``. Candidates are the tensors
    matching ``key``; the ``count`` lowest-``s_l`` candidates (ties broken by key name) are
    edited if ``s_l < threshold``: ``(1 - c) * global_l + c * local_l`` with
    ``c = clamp(s_l, 0, 1)`` (``"weighted"``), ``c = 0`` (``"replace"``) or ``c = 0.5``
    (``"half"``), computed in float64 and cast to the local dtype. Dense tensors are never
    edited.

    Args:
        local: The client's trained rank-``r_i`` adapter.
        global_truncated: The previous global adapter truncated to ``r_i``; its LoRA keys and
            shapes must equal ``local``'s (its dense tensors are ignored).
        key: Which tensors may be edited: ``"lora_A"``, ``"lora_B"`` or ``"all"``.
        count: How many of the least similar candidates to consider, at least 1.
        threshold: Edit a selected tensor only if its similarity is below this.
        mode: ``"weighted"``, ``"replace"`` or ``"half"``.

    Returns:
        An ``EditResult`` with the new state, the edited keys and all similarities.

    Raises:
        ValueError: If ``key``, ``mode`` or ``count`` is invalid, or the LoRA keys or shapes of
            the two adapters differ.
    """
    if key not in EDIT_KEY_CHOICES:
        raise ValueError(f"key must be one of {EDIT_KEY_CHOICES}, got {key!r}")
    if mode not in EDIT_MODE_CHOICES:
        raise ValueError(f"mode must be one of {EDIT_MODE_CHOICES}, got {mode!r}")
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    local_lora = {name for name in local if is_lora(name)}
    global_lora = {name for name in global_truncated if is_lora(name)}
    if local_lora != global_lora:
        raise ValueError(
            f"LoRA keys differ: only local {sorted(local_lora - global_lora)}, "
            f"only global {sorted(global_lora - local_lora)}"
        )
    similarities: dict[str, float] = {}
    for name in local:
        if name in local_lora:
            try:
                similarities[name] = cosine_similarity(local[name], global_truncated[name])
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from error
    is_candidate = _CANDIDATE[key]
    ranked = sorted(
        (similarity, name) for name, similarity in similarities.items() if is_candidate(name)
    )
    edited = tuple(name for similarity, name in ranked[:count] if similarity < threshold)

    state = {name: tensor.clone() for name, tensor in local.items()}
    local_weight = _LOCAL_WEIGHT[mode]
    for name in edited:
        c = local_weight(similarities[name])
        old = global_truncated[name].to(torch.float64)
        new = local[name].to(torch.float64)
        state[name] = ((1.0 - c) * old + c * new).to(local[name].dtype)
    return EditResult(state=state, edited=edited, similarities=similarities)
