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

from fedsim.config import limits
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
        o = cfg.objective
        top = limits.MAX_COEFFICIENT
        if not 0 <= o.mu <= top:
            raise ConfigError("objective.mu", f"must be in [0, {top:g}], got {o.mu:g}")
        if cls.enabled(cfg):
            _check_sgd_stable(cfg, o.mu * cls.coefficient(cfg), cls.name)

    @classmethod
    def coefficient(cls, cfg: FedSimConfig) -> float:
        """The largest weight the term gets on a tensor (mu multiplies it)."""
        return 1.0

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
        top = limits.MAX_COEFFICIENT
        if not 0 <= o.layer_weight <= top:
            raise ConfigError(
                "objective.layer_weight", f"must be in [0, {top:g}], got {o.layer_weight:g}"
            )
        if o.layer_skip < 0:
            raise ConfigError("objective.layer_skip", "must be >= 0")
        if cls.enabled(cfg):
            _check_sgd_stable(cfg, o.mu * cls.coefficient(cfg), cls.name)

    @classmethod
    def coefficient(cls, cfg: FedSimConfig) -> float:
        return cfg.objective.layer_weight

    def weights(self, step: ClientStep) -> dict[str, float]:
        o = self.cfg.objective
        return middle_layer_weights(step.shared, step.depths, o.layer_skip, o.layer_weight)


def _check_sgd_stable(cfg: FedSimConfig, curvature: float, name: str) -> None:
    """Plain SGD on the term ``c/2 ||theta - theta_g||^2`` multiplies ``theta - theta_g`` by
    ``1 - lr c`` every step, so it diverges geometrically once ``lr c > 2`` (AdamW normalises
    its steps and has no such limit)."""
    step = cfg.train.lr * curvature
    if cfg.train.optimizer == "sgd" and step > limits.MAX_SGD_CURVATURE_STEP:
        weight = " x objective.layer_weight" if name == "fedmllm" else ""
        raise ConfigError(
            "objective.mu",
            f"with train.optimizer=sgd, each step multiplies the distance to the global "
            f"adapter by 1 - train.lr x objective.mu{weight} = 1 - {step:.4g}, which grows "
            f"without bound once the product exceeds {limits.MAX_SGD_CURVATURE_STEP:g}; lower "
            "objective.mu or train.lr, or use train.optimizer=adamw",
        )
