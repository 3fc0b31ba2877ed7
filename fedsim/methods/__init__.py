"""Federated methods as plug-ins: one module per method, one registry, resolved once.

Each method module holds a :class:`fedsim.methods.base.Method` subclass: when the config turns
it on, its rules, and the client, server and round-loop hooks it needs. ``METHODS`` lists them
in the order their hooks run (sharing first, the client objectives, the robust rules and
differential privacy, the server-side folding, editing, pruning; the attacker last, so it
forges what finally leaves the client). ``objective.method`` takes ``plain`` or the name of a
method whose ``objective`` flag is set.

Adding a method is one module plus one line in ``METHODS`` (see the README's developer
section, with FedEx-LoRA as the worked example).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aggregation import RankMerger, get_merger, merger_class
from fedsim.methods.attack import Attack
from fedsim.methods.base import (
    BaseFolding,
    ClientStep,
    MergeBatch,
    Method,
    Objective,
    ServerContext,
)
from fedsim.methods.editing import Editing, EditingConfig, EditReport
from fedsim.methods.fedex import FedEx, FedExConfig
from fedsim.methods.fednova import FedNova
from fedsim.methods.fedprox import FedMLLM, FedProx
from fedsim.methods.flora import FLoRAFolding, concat_stacks
from fedsim.methods.privacy import Privacy, PrivacyConfig
from fedsim.methods.pruning import Pruning, PruningConfig
from fedsim.methods.robust import Robust, RobustConfig
from fedsim.methods.scaffold import Scaffold
from fedsim.methods.sharing import Sharing

if TYPE_CHECKING:
    from fedsim.config import FedSimConfig

__all__ = [
    "METHODS",
    "OBJECTIVES",
    "Attack",
    "BaseFolding",
    "ClientStep",
    "EditReport",
    "Editing",
    "EditingConfig",
    "FLoRAFolding",
    "FedEx",
    "FedExConfig",
    "FedMLLM",
    "FedNova",
    "FedProx",
    "MergeBatch",
    "Method",
    "Objective",
    "Privacy",
    "PrivacyConfig",
    "Pruning",
    "PruningConfig",
    "Robust",
    "RobustConfig",
    "Scaffold",
    "ServerContext",
    "Sharing",
    "build_merger",
    "check_methods",
    "concat_stacks",
    "enabled_methods",
]

# The one registry of methods, in hook order.
METHODS: dict[str, type[Method]] = {
    m.name: m
    for m in (
        Sharing,
        FedProx,
        FedMLLM,
        Scaffold,
        Robust,
        Privacy,
        FedNova,
        FLoRAFolding,
        FedEx,
        Editing,
        Pruning,
        Attack,
    )
}
# objective.method: plain (no method) or a method that is a client objective
OBJECTIVES: tuple[str, ...] = (
    "plain",
    *(name for name, m in METHODS.items() if getattr(m, "objective", False)),
)


def enabled_methods(cfg: FedSimConfig) -> list[Method]:
    """New instances of the methods ``cfg`` turns on, in hook order."""
    return [cls(cfg) for cls in METHODS.values() if cls.enabled(cfg)]


def build_merger(cfg: FedSimConfig) -> RankMerger:
    """The configured heterogeneous-rank merge rule, given the ``aggregation.*`` options its
    class takes."""
    cls = merger_class(cfg.aggregation.method)
    return get_merger(cls.name, **{k: getattr(cfg.aggregation, k) for k in cls.options})


def check_methods(cfg: FedSimConfig) -> None:
    """Every method's rules (:meth:`Method.check`); raises ConfigError naming the key."""
    for cls in METHODS.values():
        cls.check(cfg)
