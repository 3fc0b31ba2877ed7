"""The base class of heterogeneous-rank merge methods: hooks and capability flags.

A merger is two hooks the round loop calls: ``merge`` (client adapters in, global adapter out)
and ``redistribute`` (global adapter in, a rank-``r_i`` client view out), plus ``stream`` for
the methods that can merge one client at a time. Its class-level flags say what the method can
be combined with, so the config layer rejects an incompatible combination by reading a flag,
never by comparing method names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from aggregation.lora_keys import default_global_rank, lora_rank, truncate
from aggregation.streaming import StreamingMerge, check_stream_inputs
from aggregation.validate import check_merge_arguments, check_merge_inputs


class RankMerger:
    """Base class of heterogeneous-rank merge methods; subclasses implement ``_combine``.

    Attributes:
        name: The config name of the method (the key in ``MERGERS``).
        options: Constructor keyword arguments the method accepts.
        needs_pairs: True when the method needs both ``lora_A`` and ``lora_B`` of every module
            (it works on the products ``B_i @ A_i``), so sharing policies that keep ``A`` or
            ``B`` on the client (``share: A`` / ``share: B``) are incompatible with it.
        linear_in_factors: True when the merged factors are a per-dimension weighted sum of the
            clients' (zero-padded) factors, weights summing to 1 over the clients covering a
            dimension. Client-side corrections that rescale the factors (FedNova) or shift them
            (SCAFFOLD), and server optimisers on the factor-space pseudo-gradient, then compose
            with the merge. False for methods that merge products (SVD, stacking). The base
            class says False: a new method must opt in.
        fixed_rank: True when the global adapter has the fixed global rank ``R``; False when
            the merge decides its own rank (FLoRA: ``sum_i r_i``), in which case ``merge``
            ignores ``global_rank`` and ``previous`` for the LoRA keys.
        fresh_adapter_each_round: True when clients fold the merged update into their frozen
            base weights and start a new LoRA each round, so ``redistribute`` hands back only
            the dense keys (FLoRA).
        streams: True when ``stream`` can merge clients one at a time with the result of
            ``merge`` (up to float rounding), holding one adapter instead of all of them.
            False for methods that need every client at once (FlexLoRA's SVD).
        dp_weights: How DP-FedAvg bounds the merge's sensitivity: ``"samples"`` when the merged
            factors are an average of the clients' factors with weights fixed by the sample
            counts (zero-padding), ``"coverers"`` when each rank dimension is averaged over
            the clients that cover it (FediLoRA), None when the merge is no such average, so
            differential privacy refuses it (the base class says None: a new method must
            opt in).
        dp_refusal: Why differential privacy refuses the merge (when ``dp_weights`` is None),
            for the config error.
    """

    name: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()
    needs_pairs: ClassVar[bool] = False
    linear_in_factors: ClassVar[bool] = False
    fixed_rank: ClassVar[bool] = True
    fresh_adapter_each_round: ClassVar[bool] = False
    streams: ClassVar[bool] = False
    dp_weights: ClassVar[str | None] = None
    dp_refusal: ClassVar[str] = (
        "its merged factors are not an average of the clients' factors with fixed weights"
    )

    def merge(
        self,
        states: Sequence[Mapping[str, Tensor]],
        ranks: Sequence[int],
        num_samples: Sequence[float],
        previous: Mapping[str, Tensor] | None = None,
        global_rank: int | None = None,
    ) -> dict[str, Tensor]:
        """Validate the clients' adapters and merge them into a global adapter.

        Args:
            states: The sampled clients' LoRA state dicts (same keys), in a fixed client order.
            ranks: Each client's declared rank; must match its tensors.
            num_samples: Each client's number of training samples (positive).
            previous: The previous global adapter, if any. Ignored when ``fixed_rank`` is
                False.
            global_rank: The global rank ``R``; defaults to ``max(ranks)``, or the rank of
                ``previous`` if larger. Ignored (the method picks its own rank, e.g.
                ``sum(ranks)``) when ``fixed_rank`` is False.

        Returns:
            A new global state dict (rank ``R``, or the method's own rank).

        Raises:
            ValueError: If the inputs are inconsistent: lengths differ, no client, a sample
                count is not positive, a rank exceeds ``R`` or does not match its state, or the
                clients disagree on keys or shapes.
        """
        check_merge_arguments(states, ranks, num_samples, global_rank)
        if not self.fixed_rank:
            # The merge decides its own rank; every client rank fits under their sum.
            rank = sum(ranks)
            check_merge_inputs(states, ranks, num_samples, rank)
            return self._combine(states, ranks, num_samples, None, rank)
        rank = global_rank if global_rank is not None else default_global_rank(ranks, previous)
        check_merge_inputs(states, ranks, num_samples, rank, previous)
        return self._combine(states, ranks, num_samples, previous, rank)

    def stream(
        self,
        previous: Mapping[str, Tensor] | None,
        global_rank: int | None,
        template: Mapping[str, Tensor],
    ) -> StreamingMerge:
        """Open a streaming merge: add clients one at a time, then take ``result()``.

        The stream's result equals ``merge`` of the same clients in the order they were
        added, up to float rounding (the stream adds one client at a time).

        Args:
            previous: The previous global adapter, if any (as for ``merge``). Ignored when
                ``fixed_rank`` is False.
            global_rank: The global rank ``R``. The stream needs it before any client
                arrives, so it defaults to the rank of ``template``, or of ``previous`` if
                larger. Ignored when ``fixed_rank`` is False.
            template: A state dict with the clients' keys and, apart from the rank axis,
                their shapes (typically the global adapter being trained).

        Returns:
            A new ``StreamingMerge``.

        Raises:
            NotImplementedError: If the method does not stream (``streams`` is False); the
                message names the method.
            ValueError: If ``template`` has no LoRA tensor (and ``global_rank`` is None),
                ``global_rank`` is below 1, or ``previous`` does not fit (see
                ``check_stream_inputs``).
        """
        if not self.streams:
            raise NotImplementedError(
                f"merge method {self.name!r} ({type(self).__name__}) cannot stream: it needs "
                "every client at once; use merge()"
            )
        if not self.fixed_rank:
            return self._open_stream(None, None, template)
        rank = global_rank
        if rank is None:
            rank = default_global_rank([lora_rank(template)], previous)
        check_stream_inputs(template, rank, previous)
        return self._open_stream(previous, rank, template)

    def _open_stream(
        self,
        previous: Mapping[str, Tensor] | None,
        global_rank: int | None,
        template: Mapping[str, Tensor],
    ) -> StreamingMerge:
        raise NotImplementedError(f"{type(self).__name__} sets streams but not _open_stream")

    def _combine(
        self,
        states: Sequence[Mapping[str, Tensor]],
        ranks: Sequence[int],
        num_samples: Sequence[float],
        previous: Mapping[str, Tensor] | None,
        global_rank: int,
    ) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement _combine")

    def client_weight(self, state: Mapping[str, Tensor], num_samples: float) -> float:
        """The weight the merge gives one client before normalising: ``n_i`` by default
        (HetLoRA: ``n_i * ||B_i A_i||``). Read by the merge diagnostics."""
        return float(num_samples)

    def dimension_weights(
        self,
        ranks: Sequence[int],
        num_samples: Sequence[float],
        client_weights: Sequence[float],
        global_rank: int,
        covers: Tensor | None = None,
    ) -> Tensor:
        """``(S, R)`` float64: the merge's weight ``w_ij`` of client ``i`` on dimension ``j``
        (0 where client ``i`` does not hold ``j``), for the merge diagnostics
        (docs/algorithms.md §1.9).

        By default zero-padding's: ``w_i / sum_l w_l`` on the dimensions the client covers,
        ``w`` the :meth:`client_weight` values (``n_i`` if all are 0, as HetLoRA falls back).
        FlexLoRA and FLoRA average the products ``B_i A_i`` with ``p_i``; for them this is the
        factor-space view of that average. FediLoRA overrides it.

        Args:
            covers: ``(S, R)`` bool, the dimensions each client holds when they are not its
                leading ``r_i`` (Fed-PLoRA's modules, docs/algorithms.md §6.3); None: the
                leading ones. A merge whose weights are defined only on leading dimensions
                raises ValueError for it.
        """
        w = torch.as_tensor(client_weights, dtype=torch.float64)
        if not bool((w > 0).any()):
            w = torch.as_tensor(num_samples, dtype=torch.float64)
        if covers is None:
            covers = torch.arange(global_rank)[None, :] < torch.as_tensor(ranks)[:, None]
        return (w / w.sum())[:, None] * covers

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
