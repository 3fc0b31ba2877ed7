"""Fold peft's LoRA scaling into ``lora_B`` so that adapters of different ranks share one space.

peft applies ``dW = s * B @ A`` with ``s = alpha / r``. When clients use different ``s_i``
(``lora.scaling: rank``), equal ``B_i @ A_i`` mean different updates, so the server multiplies
each ``B_i`` by ``s_i`` before merging (the merged adapter then means ``dW = B_g @ A_g``, the
"s = 1" space) and divides by the receiving client's ``s_i`` when handing it back.

The formulas: docs/algorithms.md §0.2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from torch import Tensor

from aggregation.lora_keys import is_lora_b


def _check_scaling(scaling: float) -> None:
    if not math.isfinite(scaling) or scaling == 0:
        raise ValueError(f"LoRA scaling must be finite and non-zero, got {scaling}")


def fold_scaling(state: Mapping[str, Tensor], scaling: float) -> dict[str, Tensor]:
    """Return a copy of ``state`` with every ``lora_B`` multiplied by ``scaling``.

    Args:
        state: A LoRA state dict trained under peft scaling ``scaling``.
        scaling: The client's ``s_i = alpha_i / r_i``.

    Returns:
        A new dict of new tensors; ``lora_A`` and dense tensors are copied unchanged.

    Raises:
        ValueError: If ``scaling`` is zero or not finite (the fold could not be undone).
    """
    _check_scaling(scaling)
    return {
        key: tensor * scaling if is_lora_b(key) else tensor.clone() for key, tensor in state.items()
    }


def unfold_scaling(state: Mapping[str, Tensor], scaling: float) -> dict[str, Tensor]:
    """Return a copy of ``state`` with every ``lora_B`` divided by ``scaling``.

    Args:
        state: A LoRA state dict in the "s = 1" space.
        scaling: The receiving client's ``s_i = alpha_i / r_i``.

    Returns:
        A new dict of new tensors; ``lora_A`` and dense tensors are copied unchanged.

    Raises:
        ValueError: If ``scaling`` is zero or not finite.
    """
    _check_scaling(scaling)
    return {
        key: tensor / scaling if is_lora_b(key) else tensor.clone() for key, tensor in state.items()
    }
