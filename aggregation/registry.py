"""The one registry of heterogeneous-rank merge methods, from config name to merger class.

Method names are resolved here, once, and nowhere else. What a method can be combined with is
read from its class's capability flags (``RankMerger.needs_pairs``, ``linear_in_factors``,
``fixed_rank``, ``fresh_adapter_each_round``), never from its name.
"""

from __future__ import annotations

from typing import Any

from aggregation.damped import DampedMerger
from aggregation.fedilora import FediLoRAMerger
from aggregation.flexlora import FlexLoRAMerger
from aggregation.flora import FLoRAMerger
from aggregation.hetlora import HetLoRAMerger
from aggregation.rank_merger import RankMerger
from aggregation.zeropad import ZeroPadMerger

__all__ = [
    "MERGERS",
    "DampedMerger",
    "FLoRAMerger",
    "FediLoRAMerger",
    "FlexLoRAMerger",
    "HetLoRAMerger",
    "RankMerger",
    "ZeroPadMerger",
    "get_merger",
    "merger_class",
]

MERGERS: dict[str, type[RankMerger]] = {
    merger.name: merger
    for merger in (
        ZeroPadMerger,
        FediLoRAMerger,
        DampedMerger,
        HetLoRAMerger,
        FlexLoRAMerger,
        FLoRAMerger,
    )
}


def merger_class(name: str) -> type[RankMerger]:
    """Look up a merge method's class by its config name.

    Args:
        name: A key of ``MERGERS``.

    Returns:
        The merger class.

    Raises:
        ValueError: If ``name`` is unknown; the message lists the valid names.
    """
    try:
        return MERGERS[name]
    except KeyError:
        raise ValueError(
            f"unknown merge method {name!r}; valid methods: {', '.join(sorted(MERGERS))}"
        ) from None


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
    cls = merger_class(name)
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        raise ValueError(
            f"merge method {name!r} does not accept options {unknown}; "
            f"valid options: {list(cls.options)}"
        )
    return cls(**options)
