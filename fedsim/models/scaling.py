"""LoRA's scaling factor, without the model stack (the driver computes it too)."""

from __future__ import annotations

from fedsim.config import LoraConfig


def client_scaling(cfg: LoraConfig, rank: int, global_rank: int) -> float:
    """The factor ``s`` in ``dW = s * B @ A`` for a client of ``rank``.

    ``constant``: ``alpha / R`` for every client, so ``B @ A`` means the same everywhere;
    ``rank``: peft's ``alpha / r`` (docs/algorithms.md §0.2).
    """
    return cfg.alpha / global_rank if cfg.scaling == "constant" else cfg.alpha / rank
