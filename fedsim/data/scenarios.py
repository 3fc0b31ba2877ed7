"""Multimodal heterogeneity scenarios: which modalities each client's rows keep.

Each scenario maps (config, client, number of rows) to a :class:`ModalityMask`, seeded, so every
node derives the same masks. Names are resolved here only.

The formulas: docs/algorithms.md §4.2.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedsim.config import FedSimConfig
from fedsim.config.checks import parse_ratio
from fedsim.data.partition import (
    ModalityMask,
    cross_image_clients,
    fedilora_missing,
    hybrid_modalities,
    missing_per_sample,
)


def _aligned(cfg: FedSimConfig, client: int, n: int) -> ModalityMask:
    return ModalityMask.complete(n)


def _missing(cfg: FedSimConfig, client: int, n: int) -> ModalityMask:
    return missing_per_sample(n, cfg.data.missing_beta, cfg.seed, client)


def _fedilora(cfg: FedSimConfig, client: int, n: int) -> ModalityMask:
    return fedilora_missing(n, cfg.data.missing_rate, cfg.seed, client)


def _cross(cfg: FedSimConfig, client: int, n: int) -> ModalityMask:
    image_only = cross_image_clients(cfg.clients.num, parse_ratio(cfg.data.cross_ratio), cfg.seed)
    has_image = bool(image_only[client])
    return ModalityMask(np.full(n, has_image), np.full(n, not has_image))


def _hybrid(cfg: FedSimConfig, client: int, n: int) -> ModalityMask:
    image, text = hybrid_modalities(cfg.data.hybrid_p, cfg.seed, client)
    return ModalityMask(np.full(n, image), np.full(n, text))


SCENARIOS: dict[str, Callable[[FedSimConfig, int, int], ModalityMask]] = {
    "aligned": _aligned,
    "missing": _missing,
    "fedilora": _fedilora,
    "cross": _cross,
    "hybrid": _hybrid,
}


def client_modalities(cfg: FedSimConfig, client: int, n: int) -> ModalityMask:
    """The modality mask of ``client``'s ``n`` rows under ``data.scenario``."""
    return SCENARIOS[cfg.data.scenario](cfg, client, n)
