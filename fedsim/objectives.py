"""Client objectives: what local training adds to the cross-entropy, as hooks.

An objective is built per client task with the reference tensors it needs and offers two
hooks the training loop calls: ``penalty(params)`` (a term added to the loss) and
``correct(params)`` (a change of the gradients after ``backward``). ``params`` maps peft state
keys to the trainable parameters.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from fedsim.config import ObjectiveConfig

Params = Mapping[str, torch.nn.Parameter]
State = Mapping[str, torch.Tensor]

_LAYER = re.compile(r"\.(?:layer|layers|_blocks|blocks|h)\.(\d+)\.")


class ClientObjective:
    """Plain cross-entropy: no penalty, no gradient correction."""

    def penalty(self, params: Params) -> torch.Tensor | None:
        return None

    def correct(self, params: Params) -> None:
        return None


class Proximal(ClientObjective):
    """FedProx: ``sum_k weight_k * mu/2 * ||theta_k - theta_g,k||^2`` over the given keys.

    Args:
        mu: proximal coefficient.
        reference: the global tensors the client started from (same shapes as the params).
        weights: per-key weight; keys absent get no term.
    """

    def __init__(self, mu: float, reference: State, weights: Mapping[str, float]):
        self.mu = mu
        self.reference = {k: reference[k].detach() for k in weights}
        self.weights = dict(weights)

    def penalty(self, params: Params) -> torch.Tensor | None:
        terms = [
            w * (params[k] - self.reference[k].to(params[k].device)).pow(2).sum()
            for k, w in self.weights.items()
            if w and k in params
        ]
        return 0.5 * self.mu * torch.stack(terms).sum() if terms else None


class Scaffold(ClientObjective):
    """SCAFFOLD: the local gradient becomes ``g - c_i + c`` on the shared tensors."""

    def __init__(self, correction: State):
        self.correction = {k: v.detach() for k, v in correction.items()}

    def correct(self, params: Params) -> None:
        for k, corr in self.correction.items():
            p = params.get(k)
            if p is not None and p.grad is not None:
                p.grad.add_(corr.to(p.grad.device))


class TailPenalty(ClientObjective):
    """HetLoRA's self-pruning term ``gamma * ||B[:, r-delta:] A[r-delta:]||_F``, added to another
    objective."""

    def __init__(self, inner: ClientObjective, gamma: float, delta: int):
        self.inner, self.gamma, self.delta = inner, gamma, delta

    def penalty(self, params: Params) -> torch.Tensor | None:
        from aggregation import hetlora_tail_norm, is_lora

        tail = self.gamma * hetlora_tail_norm(
            {k: p for k, p in params.items() if is_lora(k)}, self.delta
        )
        inner = self.inner.penalty(params)
        return tail if inner is None else inner + tail

    def correct(self, params: Params) -> None:
        self.inner.correct(params)


def layer_index(key: str) -> tuple[str, int] | None:
    """``(tower, layer)`` of a parameter key such as ``...text.encoder.layer.3.attention...``.

    The tower is the path of the layer stack (``text.encoder``, ``model.vision_tower.encoder``,
    ``model.language_model``), without peft's ``base_model.model.`` prefix, so a VLM's vision
    tower and language model count their layers separately.
    """
    m = _LAYER.search(key)
    if m is None:
        return None
    tower = key[: m.start()].lstrip(".").removeprefix("base_model.model.")
    return tower, int(m.group(1))


def tower_depths(module_names) -> dict[str, int]:
    """Number of layers ``L`` of each tower, from the model's module names."""
    depth: dict[str, int] = {}
    for name in module_names:
        found = layer_index("." + name + ".")
        if found:
            tower, i = found
            depth[tower] = max(depth.get(tower, 0), i + 1)
    return depth


def middle_layer_weights(keys, depths: Mapping[str, int], skip: int, weight: float) -> dict:
    """FedMLLM's restriction: ``weight`` on keys in layers ``skip .. L-1-skip``, else 0."""
    out = {}
    for k in keys:
        found = layer_index(k)
        if found and skip <= found[1] <= depths.get(found[0], 0) - 1 - skip:
            out[k] = weight
    return out


class ObjectiveSpec:
    """A named client objective: its builder and what it asks of the server.

    Attributes:
        rescale_by_steps: the server rescales updates by local step counts (FedNova).
        control_variates: the server keeps SCAFFOLD's variate and clients keep theirs.
    """

    rescale_by_steps = False
    control_variates = False

    @staticmethod
    def build(cfg, reference, shared_keys, depths, correction) -> ClientObjective:
        return ClientObjective()


class PlainSpec(ObjectiveSpec):
    pass


class FedNovaSpec(ObjectiveSpec):
    # FedNova trains plainly: only the server's averaging changes.
    rescale_by_steps = True


class FedProxSpec(ObjectiveSpec):
    @staticmethod
    def build(cfg, reference, shared_keys, depths, correction) -> ClientObjective:
        return Proximal(cfg.mu, reference, dict.fromkeys(shared_keys, 1.0))


class FedMLLMSpec(ObjectiveSpec):
    @staticmethod
    def build(cfg, reference, shared_keys, depths, correction) -> ClientObjective:
        weights = middle_layer_weights(shared_keys, depths, cfg.layer_skip, cfg.layer_weight)
        return Proximal(cfg.mu, reference, weights)


class ScaffoldSpec(ObjectiveSpec):
    control_variates = True

    @staticmethod
    def build(cfg, reference, shared_keys, depths, correction) -> ClientObjective:
        return Scaffold(correction or {})


# The one place objective names are resolved.
OBJECTIVES: dict[str, type[ObjectiveSpec]] = {
    "plain": PlainSpec,
    "fedprox": FedProxSpec,
    "fedmllm": FedMLLMSpec,
    "scaffold": ScaffoldSpec,
    "fednova": FedNovaSpec,
}


def objective_spec(name: str) -> type[ObjectiveSpec]:
    """The spec of objective ``name``; ValueError listing the valid names otherwise."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(
            f"unknown objective.method {name!r}; allowed: {', '.join(OBJECTIVES)}"
        ) from None


def build_objective(
    cfg: ObjectiveConfig,
    reference: State,
    shared_keys: list[str],
    depths: Mapping[str, int],
    scaffold_correction: State | None = None,
) -> ClientObjective:
    """The configured objective for one client task.

    Args:
        cfg: the ``objective`` config section.
        reference: the global tensors the client received (model space).
        shared_keys: the keys the client shares (the terms apply to these only).
        depths: layers per tower (for ``fedmllm``).
        scaffold_correction: ``c - c_i`` per shared key (for ``scaffold``).

    Raises:
        ValueError: an unknown ``objective.method``.
    """
    spec = objective_spec(cfg.method)
    return spec.build(cfg, reference, shared_keys, depths, scaffold_correction)
