"""The one registry of aggregation's plug-ins: merge rules, server optimisers, sharing policies.

Light on purpose (no torch): each entry is a ``"module:Name"`` string, imported when a class is
first asked for, so the config can list and check names without loading any tensor code. Names
are resolved here, once, and nowhere else. What a merge can be combined with is read from its
class's capability flags (``RankMerger.needs_pairs``, ``linear_in_factors``, ``fixed_rank``,
``fresh_adapter_each_round``, ...), never from its name.

Adding a merge rule is one module holding a :class:`~aggregation.rank_merger.RankMerger`
subclass plus one line in ``MERGERS``; a server optimiser, one
:class:`~aggregation.server_opt.ServerOptimizer` subclass plus one line in
``SERVER_OPTIMIZERS``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aggregation.rank_merger import RankMerger
    from aggregation.server_opt import ServerOptimizer

__all__ = [
    "MERGERS",
    "SERVER_OPTIMIZERS",
    "SHARING_POLICIES",
    "get_merger",
    "get_server_optimizer",
    "load",
    "merger_class",
    "server_optimizer_class",
]

# config name -> "module:Class"; the order is the order the help text lists them
MERGERS: dict[str, str] = {
    "zeropad": "aggregation.zeropad:ZeroPadMerger",
    "fedilora": "aggregation.fedilora:FediLoRAMerger",
    "fedilora_damped": "aggregation.damped:DampedMerger",
    "hetlora": "aggregation.hetlora:HetLoRAMerger",
    "flexlora": "aggregation.flexlora:FlexLoRAMerger",
    "flora": "aggregation.flora:FLoRAMerger",
    "raflora": "aggregation.raflora:RaFLoRAMerger",
}
SERVER_OPTIMIZERS: dict[str, str] = {
    "fedavg": "aggregation.server_opt:FedAvg",
    "fedavgm": "aggregation.server_opt:FedAvgM",
    "fedadagrad": "aggregation.server_opt:FedAdagrad",
    "fedadam": "aggregation.server_opt:FedAdam",
    "fedyogi": "aggregation.server_opt:FedYogi",
}
# which of a client's tensors go to the server (see aggregation.sharing for each rule)
SHARING_POLICIES: tuple[str, ...] = ("all", "B", "A", "none")


def load(ref: str) -> Any:
    """The object a ``"module:Name"`` string names, its module imported on first use."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _lookup(table: dict[str, str], name: str, what: str, plural: str) -> Any:
    try:
        ref = table[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown {what} {name!r}; valid {plural}: {', '.join(sorted(table))}"
        ) from None
    return load(ref)


def merger_class(name: str) -> type[RankMerger]:
    """The merge rule registered under ``name``.

    Raises:
        ValueError: ``name`` is unknown; the message lists the valid names.
    """
    return _lookup(MERGERS, name, "merge method", "methods")


def server_optimizer_class(name: str) -> type[ServerOptimizer]:
    """The server optimiser registered under ``name``.

    Raises:
        ValueError: ``name`` is unknown; the message lists the valid names.
    """
    return _lookup(SERVER_OPTIMIZERS, name, "server optimizer", "optimizers")


def _build(cls: type, name: str, what: str, options: dict[str, Any]) -> Any:
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        raise ValueError(
            f"{what} {name!r} does not accept options {unknown}; valid options: {list(cls.options)}"
        )
    return cls(**options)


def get_merger(name: str, **options: Any) -> RankMerger:
    """Build the merger registered under ``name``.

    Args:
        name: A key of ``MERGERS``.
        **options: Constructor options of that method (see its ``options``).

    Returns:
        A new merger instance.

    Raises:
        ValueError: If ``name`` is unknown (the valid names are listed), an option is not
            accepted by the method (its valid options are listed), or an option value is invalid.
    """
    return _build(merger_class(name), name, "merge method", options)


def get_server_optimizer(name: str, **options: float) -> ServerOptimizer:
    """Build the server optimiser registered under ``name``.

    Args:
        name: A key of ``SERVER_OPTIMIZERS``.
        **options: Constructor options of that optimiser (see its ``options``).

    Returns:
        A new optimiser with fresh moments.

    Raises:
        ValueError: If ``name`` is unknown (the valid names are listed), an option is not
            accepted (the valid options are listed), or an option value is out of range.
    """
    return _build(server_optimizer_class(name), name, "server optimizer", options)
