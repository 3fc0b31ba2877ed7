"""Sharing policies (docs/algorithms.md §2): which of a client's tensors go to the server.

- ``all``: every tensor is shared (default).
- ``B``: pLoRA, ``lora_B`` is shared and each client keeps its own ``lora_A``.
- ``A``: FedSA-LoRA, ``lora_A`` is shared and each client keeps its own ``lora_B``.
- ``none``: the local-only baseline, nothing leaves the client.

Dense keys (anything that is not a LoRA factor, e.g. a classifier head) are shared under
``all``, ``A`` and ``B`` and private under ``none``. The A/B choice is about which LoRA factor
personalises the model; a dense tensor is no factor, so those policies leave it averaged as in
FedAvg, while the local-only baseline by definition keeps everything on the client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Literal

from torch import Tensor

from aggregation.lora_keys import is_lora, is_lora_a, is_lora_b
from aggregation.registry import SHARING_POLICIES

SharePolicy = Literal["all", "B", "A", "none"]  # = SHARING_POLICIES

_SHARED: dict[str, Callable[[str], bool]] = {
    "all": lambda key: True,
    "B": lambda key: is_lora_b(key) or not is_lora(key),
    "A": lambda key: is_lora_a(key) or not is_lora(key),
    "none": lambda key: False,
}


def _rule(policy: str) -> Callable[[str], bool]:
    try:
        return _SHARED[policy]
    except KeyError:
        raise ValueError(
            f"unknown sharing policy {policy!r}; valid policies: {', '.join(SHARING_POLICIES)}"
        ) from None


def shared_keys(keys: Iterable[str], policy: SharePolicy) -> list[str]:
    """List the keys a client sends to the server under ``policy``.

    Args:
        keys: A client's state-dict keys.
        policy: One of ``SHARING_POLICIES``.

    Returns:
        The shared keys, in the order given.

    Raises:
        ValueError: If ``policy`` is unknown (the valid ones are listed).
    """
    rule = _rule(policy)
    return [key for key in keys if rule(key)]


def split_state(
    state: Mapping[str, Tensor], policy: SharePolicy
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a client's state into the part it uploads and the part it keeps.

    Args:
        state: The client's state dict.
        policy: One of ``SHARING_POLICIES``.

    Returns:
        ``(shared, private)``: two new dicts of copied tensors, each in ``state``'s key order,
        together holding every key once.

    Raises:
        ValueError: If ``policy`` is unknown (the valid ones are listed).
    """
    rule = _rule(policy)
    shared = {key: tensor.clone() for key, tensor in state.items() if rule(key)}
    private = {key: tensor.clone() for key, tensor in state.items() if not rule(key)}
    return shared, private


def join_state(shared: Mapping[str, Tensor], private: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Put a client's state back together from the received shared part and its private part.

    Args:
        shared: The shared tensors (e.g. the redistributed global ones).
        private: The tensors the client kept.

    Returns:
        A new dict of copied tensors, shared keys first, then private ones.

    Raises:
        ValueError: If a key is in both parts (the keys are named).
    """
    overlap = sorted(set(shared) & set(private))
    if overlap:
        raise ValueError(f"keys both shared and private: {overlap}")
    return {key: tensor.clone() for key, tensor in (*shared.items(), *private.items())}
