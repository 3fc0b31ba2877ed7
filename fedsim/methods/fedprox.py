"""FedProx's proximal term, and FedMLLM's layer-restricted variant of it
(docs/algorithms.md §3.2, §3.5).

FedProx adds ``mu/2 ||theta - theta_g||^2`` over the shared tensors to the local loss; FedMLLM
weights the same term by ``objective.layer_weight`` on the middle layers
``layer_skip .. L-1-layer_skip`` of each tower only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import torch

from fedsim.errors import ConfigError
from fedsim.methods.base import ClientStep, ObjectiveMethod, Params
from fedsim.models.layers import middle_layer_weights

if TYPE_CHECKING:
    from fedsim.config import FedSimConfig


class Proximal:
    """``sum_k weight_k * mu/2 * ||theta_k - theta_g,k||^2`` over the given keys.

    Args:
        mu: proximal coefficient.
        reference: the global tensors the client started from (same shapes as the params).
        weights: per-key weight; keys absent get no term.
    """

    def __init__(self, mu: float, reference: Mapping[str, torch.Tensor], weights: Mapping):
        self.mu = mu
        self.reference = {k: reference[k].detach() for k in weights}
        self.weights = dict(weights)

    def __call__(self, params: Params) -> torch.Tensor | None:
        terms = [
            w * (params[k] - self.reference[k].to(params[k].device)).pow(2).sum()
            for k, w in self.weights.items()
            if w and k in params
        ]
        return 0.5 * self.mu * torch.stack(terms).sum() if terms else None


class FedProx(ObjectiveMethod):
    """``objective.method=fedprox``: the proximal term on every shared tensor."""

    name: ClassVar[str] = "fedprox"
    order: ClassVar[int] = 20

    @classmethod
    def check(cls, cfg: FedSimConfig) -> None:
        if cfg.objective.mu < 0:
            raise ConfigError("objective.mu", "must be >= 0")

    def weights(self, step: ClientStep) -> dict[str, float]:
        return dict.fromkeys(step.shared, 1.0)

    def before_training(self, step: ClientStep) -> None:
        term = Proximal(self.cfg.objective.mu, step.start, self.weights(step))
        step.objective.penalties.append(term)


class FedMLLM(FedProx):
    """``objective.method=fedmllm``: the term weighted on each tower's middle layers only."""

    name: ClassVar[str] = "fedmllm"
    order: ClassVar[int] = 21

    @classmethod
    def check(cls, cfg: FedSimConfig) -> None:
        o = cfg.objective
        if o.layer_weight < 0:
            raise ConfigError("objective.layer_weight", "must be >= 0")
        if o.layer_skip < 0:
            raise ConfigError("objective.layer_skip", "must be >= 0")

    def weights(self, step: ClientStep) -> dict[str, float]:
        o = self.cfg.objective
        return middle_layer_weights(step.shared, step.depths, o.layer_skip, o.layer_weight)
