"""The one registry of heterogeneous-rank merge methods, from config name to merger class.

A merger is two hooks the round loop calls: ``merge`` (client adapters in, global adapter out)
and ``redistribute`` (global adapter in, a rank-``r_i`` client view out). Method names are
resolved here, once, and nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from torch import Tensor

from aggregation.fedilora import EMPTY_DIM_CHOICES, EmptyDim, fedilora_merge
from aggregation.lora_keys import default_global_rank, truncate
from aggregation.validate import check_merge_inputs
from aggregation.zeropad import zeropad_merge


class RankMerger:
    """Base class of heterogeneous-rank merge methods; subclasses implement ``_combine``.

    Attributes:
        name: The config name of the method (the key in ``MERGERS``).
        options: Constructor keyword arguments the method accepts.
    """

    name: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()

    def merge(
        self,
        states: Sequence[Mapping[str, Tensor]],
        ranks: Sequence[int],
        num_samples: Sequence[float],
        previous: Mapping[str, Tensor] | None = None,
        global_rank: int | None = None,
    ) -> dict[str, Tensor]:
        """Validate the clients' adapters and merge them into a rank-``R`` global adapter.

        Args:
            states: The sampled clients' LoRA state dicts (same keys), in a fixed client order.
            ranks: Each client's declared rank; must match its tensors.
            num_samples: Each client's number of training samples (positive).
            previous: The previous global adapter, if any.
            global_rank: The global rank ``R``; defaults to ``max(ranks)``, or the rank of
                ``previous`` if larger.

        Returns:
            A new rank-``R`` global state dict.

        Raises:
            ValueError: If the inputs are inconsistent: lengths differ, no client, a sample
                count is not positive, a rank exceeds ``R`` or does not match its state, or the
                clients disagree on keys or shapes.
        """
        rank = global_rank if global_rank is not None else default_global_rank(ranks, previous)
        check_merge_inputs(states, ranks, num_samples, rank, previous)
        return self._combine(states, ranks, num_samples, previous, rank)

    def _combine(
        self,
        states: Sequence[Mapping[str, Tensor]],
        ranks: Sequence[int],
        num_samples: Sequence[float],
        previous: Mapping[str, Tensor] | None,
        global_rank: int,
    ) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement _combine")

    def redistribute(self, global_state: Mapping[str, Tensor], rank: int) -> dict[str, Tensor]:
        """Hand the global adapter to a rank-``rank`` client; by default truncate it.

        Args:
            global_state: The rank-``R`` global state dict.
            rank: The receiving client's rank.

        Returns:
            A new state dict with ``A[:rank]``, ``B[:, :rank]`` and dense tensors unchanged.

        Raises:
            ValueError: If ``rank`` is outside ``[1, R]``.
        """
        return truncate(global_state, rank)


class ZeroPadMerger(RankMerger):
    """Zero-padding FedAvg (ALGORITHMS 1.1), the baseline that dilutes high dimensions."""

    name: ClassVar[str] = "zeropad"

    def _combine(
        self,
        states: Sequence[Mapping[str, Tensor]],
        ranks: Sequence[int],
        num_samples: Sequence[float],
        previous: Mapping[str, Tensor] | None,
        global_rank: int,
    ) -> dict[str, Tensor]:
        return zeropad_merge(states, ranks, num_samples, global_rank=global_rank)


class FediLoRAMerger(RankMerger):
    """FediLoRA dimension-wise reweighting (ALGORITHMS 1.2).

    Args:
        empty_dim: What an uncovered dimension becomes: ``"keep"`` its previous global value,
            or ``"zero"``.

    Raises:
        ValueError: If ``empty_dim`` is not a valid choice.
    """

    name: ClassVar[str] = "fedilora"
    options: ClassVar[tuple[str, ...]] = ("empty_dim",)

    def __init__(self, empty_dim: EmptyDim = "keep") -> None:
        if empty_dim not in EMPTY_DIM_CHOICES:
            raise ValueError(f"empty_dim must be one of {EMPTY_DIM_CHOICES}, got {empty_dim!r}")
        self.empty_dim: EmptyDim = empty_dim

    def _combine(
        self,
        states: Sequence[Mapping[str, Tensor]],
        ranks: Sequence[int],
        num_samples: Sequence[float],
        previous: Mapping[str, Tensor] | None,
        global_rank: int,
    ) -> dict[str, Tensor]:
        return fedilora_merge(
            states,
            ranks,
            num_samples,
            previous=previous,
            global_rank=global_rank,
            empty_dim=self.empty_dim,
        )


MERGERS: dict[str, type[RankMerger]] = {
    merger.name: merger for merger in (ZeroPadMerger, FediLoRAMerger)
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
