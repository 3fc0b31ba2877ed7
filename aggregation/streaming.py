"""Streaming linear merges: add one client at a time, so the server holds one adapter, not all.

A batch merge (``RankMerger.merge``) takes every sampled client's state at once, so the server
holds ``|S|`` adapters. The merges that are weighted sums of zero-padded factors (zero-padding,
FediLoRA, HetLoRA) need only running sums: ``acc += w_i * pad(x_i)`` and ``total += w_i``, then
``acc / total`` at the end. A ``StreamingMerge`` keeps those sums, so its memory is one global
adapter whatever the number of clients; ``RankMerger.stream`` opens the one that matches a
method. FLoRA's output has rank ``sum_i r_i``, so its stream keeps the clients' factors and
stacks them at the end: its memory is the size of its output, as in the batch merge.

Sums are kept in the dtype the batch merge sums in (``stacking.accumulation_dtype``: float32
for float32 and half inputs, float64 for float64), the weights (sample counts, masses, HetLoRA
norms) in float64, and the one division and the cast to the clients' dtype happen at the end.
Float64 sums were measured at 2.8 memory passes for 500 clients (the float32 -> float64
conversion of every input element), float32 sums at 1.1, with results within the same bound of
the batch merge (tests/aggregation/test_streaming.py). Float addition is not associative, so
the result depends (in its last bits) on the order clients are added; ``InOrder`` releases
clients in id order whatever order they arrive in, which makes the result bit-identical
across arrival orders.

The formulas, and which rounds stream: docs/algorithms.md §1.8.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

from aggregation.lora_keys import lora_rank, rank_axis
from aggregation.pairs import lora_pairs
from aggregation.validate import MERGE_DTYPES, UpdateRejected, check_client_arguments

# Elements per piece when a large tensor is added: a sum of another dtype (half inputs into
# float32 sums) makes a converted copy of each piece first, and a copy this small stays in
# cache (a 20M-element add in one piece was about 6x slower).
_CHUNK = 1 << 18


def _add_scaled(targets: list[Tensor], sources: list[Tensor], weight: float) -> None:
    """``targets[k] += weight * sources[k]`` for every ``k``, in the targets' dtype.

    One fused call instead of a Python loop: with ~60 tensors per client, per-op dispatch
    would otherwise cost about as much as the arithmetic. Tensors above ``4 * _CHUNK``
    elements are added in pieces of about ``_CHUNK`` elements (split along dim 0).
    """
    if not targets:
        return
    if any(target.numel() > 4 * _CHUNK for target in targets):
        split_targets, split_sources = [], []
        for target, source in zip(targets, sources, strict=True):
            if target.numel() > 4 * _CHUNK and target.dim() > 0:
                rows = max(1, _CHUNK * target.shape[0] // target.numel())
                split_targets += target.split(rows)
                split_sources += source.split(rows)
            else:
                split_targets.append(target)
                split_sources.append(source)
        targets, sources = split_targets, split_sources
    torch._foreach_add_(targets, sources, alpha=weight)


def _scale_rows_(tensor: Tensor, weights: Tensor) -> Tensor:
    """``tensor[j] *= weights[j]`` in place, computed in ``weights``' dtype, in cache-sized pieces.

    Args:
        tensor: A tensor whose dim 0 has one entry per weight.
        weights: Weights of shape ``(tensor.shape[0],)``.

    Returns:
        ``tensor``.
    """
    rows = max(1, _CHUNK * tensor.shape[0] // max(1, tensor.numel()))
    tail = [1] * (tensor.dim() - 1)
    for part, part_weights in zip(tensor.split(rows), weights.split(rows), strict=True):
        part.mul_(part_weights.view(-1, *tail))
    return tensor


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a batch merge sums a key in (``stacking.accumulation_dtype`` of one dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_stream_inputs(
    template: Mapping[str, Tensor], global_rank: int, previous: Mapping[str, Tensor] | None
) -> None:
    """Check that a stream's global rank and previous global state fit its template.

    Args:
        template: A state dict with the clients' keys and (apart from the rank) shapes.
        global_rank: The global rank ``R``.
        previous: The previous global state, if any.

    Raises:
        ValueError: If ``global_rank`` is below 1, or ``previous`` has a rank above
            ``global_rank``, lacks a LoRA key of ``template`` or has another non-rank shape
            (the key is named).
    """
    if global_rank < 1:
        raise ValueError(f"global_rank must be at least 1, got {global_rank}")
    if previous is None:
        return
    previous_rank = lora_rank(previous)
    if previous_rank > global_rank:
        raise ValueError(
            f"previous global state has rank {previous_rank} > global_rank {global_rank}"
        )
    for key, tensor in template.items():
        axis = rank_axis(key)
        if axis is None:
            continue
        if key not in previous:
            raise ValueError(f"previous global state lacks LoRA key {key}")
        old = previous[key]
        if old.dim() != tensor.dim() or any(
            a != b for d, (a, b) in enumerate(zip(old.shape, tensor.shape)) if d != axis
        ):
            raise ValueError(
                f"{key}: previous global shape {tuple(old.shape)} does not fit template "
                f"shape {tuple(tensor.shape)}"
            )


class StreamingMerge:
    """Accumulate clients one at a time; ``result()`` is the merged global state.

    The base class checks every added state against the template and averages the dense
    (non-LoRA) keys with ``p_i = n_i / sum n`` (FedAvg); subclasses merge the LoRA keys.
    Accumulators are allocated at the first ``add``, on that client's devices, and each key
    of the result has that client's dtype of the key. ``result()`` does not consume the
    stream: more clients may be added after it.

    Only metadata is checked (keys, shapes, rank, dtype, device); values are not: like the
    batch merge, a stream trusts that the caller has already checked each upload (finite
    values, see ``check_update``).

    Args:
        template: A state dict with the clients' keys and, apart from the rank axis, their
            shapes (typically the global adapter); only its shapes are kept.
        global_rank: The largest rank a client may have, or None for no bound.

    Attributes:
        count: The number of clients added so far.
        global_rank: The bound on client ranks given at construction.

    Raises:
        ValueError: If a template value is not a tensor, a LoRA tensor has no rank axis, or
            ``global_rank`` is below 1.
    """

    def __init__(self, template: Mapping[str, Tensor], global_rank: int | None) -> None:
        if global_rank is not None and global_rank < 1:
            raise ValueError(f"global_rank must be at least 1, got {global_rank}")
        self.global_rank = global_rank
        self.count = 0
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._axes: dict[str, int | None] = {}
        for key, tensor in template.items():
            if not isinstance(tensor, Tensor):
                raise ValueError(f"template {key}: expected a tensor, got {type(tensor).__name__}")
            axis = rank_axis(key)
            if axis is not None and tensor.dim() <= axis:
                raise ValueError(f"template {key}: shape {tuple(tensor.shape)} has no rank axis")
            self._shapes[key] = tuple(tensor.shape)
            self._axes[key] = axis
        self._lora_keys = [key for key, axis in self._axes.items() if axis is not None]
        self._dense_keys = [key for key, axis in self._axes.items() if axis is None]
        self._expected: dict[int, dict[str, tuple[int, ...]]] = {}
        self._order: list[str] = []  # the first client's key order, which the result keeps
        self._dtypes: dict[str, torch.dtype] = {}
        self._devices: dict[str, torch.device] = {}
        self._dense: list[Tensor] = []  # sums of n_i * x_i, one per dense key
        self._samples = 0.0  # sum of n_i

    def add(self, state: Mapping[str, Tensor], rank: int, num_samples: float) -> None:
        """Check one client's state and add it to the running sums.

        Args:
            state: The client's LoRA state dict (not mutated, not kept unless a subclass says
                so).
            rank: The client's declared LoRA rank.
            num_samples: The client's number of training samples (positive).

        A state that raises leaves the stream unchanged.

        Raises:
            ValueError: If ``rank`` is not an int or ``num_samples`` not a number (named),
                ``num_samples`` is not positive and finite, ``rank`` is below 1 or above
                ``global_rank``, or the client's LoRA weight (HetLoRA's ``n_i * ||B_i A_i||``)
                is not finite.
            UpdateRejected: (a ``ValueError``) If ``state`` is not a mapping of string keys
                to dense tensors that hold values (a meta tensor has none), the keys differ
                from the template's (all are named), or a key's value is not a tensor, has a
                dtype the mergers do not accept, another dtype or device than the first
                client's, or another shape than the template's at ``rank`` (the key is named).
        """
        check_client_arguments(state, rank, num_samples)
        weight = float(num_samples)
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"num_samples must be positive and finite, got {num_samples}")
        self._check(state, rank)
        lora_weight = self._lora_weight(state, weight)  # may raise: nothing is changed yet
        if self.count == 0:
            self._open(state)
        _add_scaled(self._dense, [state[key] for key in self._dense_keys], weight)
        self._samples += weight
        self._add_lora(state, rank, weight, lora_weight)
        self.count += 1

    def result(self) -> dict[str, Tensor]:
        """Return the merged global state; the stream stays usable.

        Returns:
            A new state dict in the first client's key order, each tensor in that client's
            dtype of the key.

        Raises:
            ValueError: If no client has been added.
        """
        if self.count == 0:
            raise ValueError("no client was added to the stream; there is nothing to merge")
        merged = self._lora_result()
        for key, acc in zip(self._dense_keys, self._dense, strict=True):
            merged[key] = (acc / self._samples).to(self._dtypes[key])
        return {key: merged[key] for key in self._order}

    def _expected_shapes(self, rank: int) -> dict[str, tuple[int, ...]]:
        expected = self._expected.get(rank)
        if expected is None:
            expected = {}
            for key, shape in self._shapes.items():
                axis = self._axes[key]
                if axis is not None:
                    shape = (*shape[:axis], rank, *shape[axis + 1 :])
                expected[key] = shape
            self._expected[rank] = expected
        return expected

    def _check(self, state: Mapping[str, Tensor], rank: int) -> None:
        if rank < 1 or (self.global_rank is not None and rank > self.global_rank):
            bound = "inf)" if self.global_rank is None else f"{self.global_rank}]"
            raise ValueError(f"rank {rank} is outside [1, {bound}")
        if state.keys() != self._shapes.keys():
            missing = sorted(set(self._shapes) - set(state))
            unexpected = sorted(set(state) - set(self._shapes))
            raise UpdateRejected(
                f"state keys differ from the template: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        expected = self._expected_shapes(rank)
        first = self.count == 0
        for key, tensor in state.items():
            if not isinstance(tensor, Tensor):
                raise UpdateRejected(f"{key}: expected a tensor, got {type(tensor).__name__}")
            if first:
                if tensor.dtype not in MERGE_DTYPES:
                    raise UpdateRejected(f"{key}: dtype {tensor.dtype} cannot be merged")
            elif tensor.dtype != self._dtypes[key] or tensor.device != self._devices[key]:
                raise UpdateRejected(
                    f"{key}: {tensor.dtype} on {tensor.device} differs from the first "
                    f"client's {self._dtypes[key]} on {self._devices[key]}"
                )
            if tensor.shape != expected[key]:
                raise UpdateRejected(
                    f"{key}: shape {tuple(tensor.shape)} does not match expected "
                    f"{expected[key]} for rank {rank}"
                )

    def _open(self, state: Mapping[str, Tensor]) -> None:
        """Record the first client's key order, dtypes and devices; allocate the sums."""
        self._order = list(state)
        self._dtypes = {key: tensor.dtype for key, tensor in state.items()}
        self._devices = {key: tensor.device for key, tensor in state.items()}
        self._dense = [
            torch.zeros(
                self._shapes[key],
                dtype=_working_dtype(self._dtypes[key]),
                device=self._devices[key],
            )
            for key in self._dense_keys
        ]
        self._open_lora()

    def _open_lora(self) -> None:
        """Allocate the LoRA accumulators (``_dtypes``/``_devices`` are set)."""

    def _lora_weight(self, state: Mapping[str, Tensor], num_samples: float) -> float:
        """The client's weight on the LoRA keys; by default its sample count."""
        return num_samples

    def _add_lora(
        self, state: Mapping[str, Tensor], rank: int, num_samples: float, weight: float
    ) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _add_lora")

    def _lora_result(self) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement _lora_result")


class _RankSums(StreamingMerge):
    """A rank-``R`` sum per LoRA key, in peft's layout; a client adds to ``[:r_i]``."""

    def __init__(self, template: Mapping[str, Tensor], global_rank: int) -> None:
        super().__init__(template, global_rank)
        self._acc: list[Tensor] = []
        self._views: dict[int, list[Tensor]] = {}

    def _open_lora(self) -> None:
        rank = self.global_rank
        self._acc = [
            torch.zeros(
                self._expected_shapes(rank)[key],
                dtype=_working_dtype(self._dtypes[key]),
                device=self._devices[key],
            )
            for key in self._lora_keys
        ]

    def _add_padded(self, state: Mapping[str, Tensor], rank: int, weight: float) -> None:
        """``acc[:rank] += weight * x`` on every LoRA key (no padded copy of ``x``)."""
        views = self._views.get(rank)
        if views is None:
            axes = [self._axes[key] for key in self._lora_keys]
            views = [acc.narrow(axis, 0, rank) for acc, axis in zip(self._acc, axes, strict=True)]
            self._views[rank] = views
        _add_scaled(views, [state[key] for key in self._lora_keys], weight)


class PaddedStream(_RankSums):
    """Zero-padding with one weight per client: ``sum_i w_i pad(x_i) / sum_i w_i``.

    Zero-padding FedAvg (docs/algorithms.md §1.1) uses ``w_i = n_i``; HetLoRA (§1.4) passes
    ``weight(state, n_i) = n_i * product_norm(state)``. As in ``hetlora_weights``, when every
    weight is 0 the LoRA keys fall back to ``w_i = n_i``: while no positive weight has been
    seen the sum is kept with ``n_i``, and the first positive weight restarts it (the clients
    before it have weight 0 in the weighted sum), so one accumulator suffices.

    Args:
        template: The clients' keys and shapes (see ``StreamingMerge``).
        global_rank: The global rank ``R``.
        weight: ``weight(state, num_samples)``, a finite non-negative client weight; None
            means ``num_samples``.

    Raises:
        ValueError: As ``StreamingMerge``.
    """

    def __init__(
        self,
        template: Mapping[str, Tensor],
        global_rank: int,
        weight: Callable[[Mapping[str, Tensor], float], float] | None = None,
    ) -> None:
        super().__init__(template, global_rank)
        self._weight = weight
        self._weight_total = 0.0  # sum of w_i
        self._fallback_total = 0.0  # sum of n_i while every w_i so far is 0

    def _lora_weight(self, state: Mapping[str, Tensor], num_samples: float) -> float:
        if self._weight is None:
            return num_samples
        weight = float(self._weight(state, num_samples))
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"client weight must be finite and non-negative, got {weight}")
        return weight

    def _add_lora(
        self, state: Mapping[str, Tensor], rank: int, num_samples: float, weight: float
    ) -> None:
        if weight > 0:
            if self._weight_total == 0 and self._fallback_total > 0:
                for acc in self._acc:
                    acc.zero_()
            self._weight_total += weight
            self._add_padded(state, rank, weight)
        elif self._weight_total == 0:
            self._fallback_total += num_samples
            self._add_padded(state, rank, num_samples)

    def _lora_result(self) -> dict[str, Tensor]:
        total = self._weight_total if self._weight_total > 0 else self._fallback_total
        return {
            key: (acc / total).to(self._dtypes[key])
            for key, acc in zip(self._lora_keys, self._acc, strict=True)
        }


class DimensionStream(_RankSums):
    """FediLoRA's dimension-wise average (docs/algorithms.md §1.2), one client at a time.

    ``acc[:r_i] += n_i * x_i`` and ``mass[:r_i] += n_i``; dimension ``j`` is
    ``acc[j] / mass[j]`` where ``mass[j] > 0``. An uncovered dimension (``mass[j] == 0``) takes
    ``fill``'s value (zero past ``fill``'s rank) or, when ``fill`` is None, zero: pass the
    previous global state for ``empty_dim="keep"`` and None for ``"zero"``.

    Args:
        template: The clients' keys and shapes (see ``StreamingMerge``).
        global_rank: The global rank ``R``.
        fill: The values of uncovered dimensions (rank at most ``R``, checked by
            ``check_stream_inputs``), or None. Kept by reference and not mutated.

    Raises:
        ValueError: As ``StreamingMerge``.
    """

    def __init__(
        self,
        template: Mapping[str, Tensor],
        global_rank: int,
        fill: Mapping[str, Tensor] | None = None,
    ) -> None:
        super().__init__(template, global_rank)
        self._fill = fill
        self._mass = torch.zeros(global_rank, dtype=torch.float64)  # (R,)

    def _add_lora(
        self, state: Mapping[str, Tensor], rank: int, num_samples: float, weight: float
    ) -> None:
        self._mass[:rank] += num_samples
        self._add_padded(state, rank, num_samples)

    def _lora_result(self) -> dict[str, Tensor]:
        covered = self._mass > 0  # (R,); a prefix, since client i covers dimensions [0, r_i)
        divisor = torch.where(covered, self._mass, torch.ones_like(self._mass))
        width = int(covered.sum())
        merged: dict[str, Tensor] = {}
        for key, acc in zip(self._lora_keys, self._acc, strict=True):
            axis = self._axes[key]
            shape = [1] * acc.dim()
            shape[axis] = -1
            out = acc / divisor.to(acc.device).view(shape)  # uncovered dimensions are 0
            if self._fill is not None:
                old = self._fill[key]
                kept = old.shape[axis] - width
                if kept > 0:
                    # Through the batch merge's working dtype, so the values match it exactly.
                    values = old.narrow(axis, width, kept).to(_working_dtype(self._dtypes[key]))
                    out.narrow(axis, width, kept).copy_(values)
            merged[key] = out.to(self._dtypes[key])
        return merged


class StackedStream(StreamingMerge):
    """FLoRA stacking (docs/algorithms.md §1.6), one client at a time; memory is the output's size.

    The stacked adapter has rank ``sum_i r_i`` and holds every client's factors, so nothing
    smaller than the output can be kept: each ``add`` copies the client's ``lora_A`` and
    ``lora_B`` (in their dtype), and ``result()`` builds ``A_g = concat_rows(p_i A_i)`` (the
    scaling in float64) and ``B_g = concat_cols(B_i)`` in client order. While ``result()``
    runs, one module's stacked factors exist twice.

    Args:
        template: The clients' keys and shapes (see ``StreamingMerge``); its factors must
            come in pairs. Client ranks are not bounded.

    Raises:
        ValueError: As ``StreamingMerge``, or if a factor of ``template`` has no partner.
    """

    def __init__(self, template: Mapping[str, Tensor]) -> None:
        super().__init__(template, None)
        self._pairs = list(lora_pairs(template).values())
        self._pieces: list[tuple[float, int, dict[str, Tensor]]] = []  # (n_i, r_i, factors)

    def _add_lora(
        self, state: Mapping[str, Tensor], rank: int, num_samples: float, weight: float
    ) -> None:
        factors = {key: state[key].clone() for key in self._lora_keys}
        self._pieces.append((num_samples, rank, factors))

    def _lora_result(self) -> dict[str, Tensor]:
        counts = torch.tensor([n for n, _, _ in self._pieces], dtype=torch.float64)
        ranks = torch.tensor([r for _, r, _ in self._pieces])
        row_weights = torch.repeat_interleave(counts / self._samples, ranks)  # (sum r_i,)
        merged: dict[str, Tensor] = {}
        for a_key, b_key in self._pairs:
            a_cat = torch.cat([factors[a_key] for _, _, factors in self._pieces], dim=0)
            # p_i * A_i is computed in float64 and rounded once to A's dtype.
            merged[a_key] = _scale_rows_(a_cat, row_weights.to(a_cat.device))
            merged[b_key] = torch.cat([factors[b_key] for _, _, factors in self._pieces], dim=1)
        return merged


class InOrder:
    """Releases items in ascending key order as soon as every smaller expected key is resolved.

    A key is resolved when its item is offered or when it is dropped (its client failed).
    Feeding released items to a ``StreamingMerge`` in release order adds the clients in id
    order whatever order they arrive in, so the float sums, and the result, are bit-identical
    across arrival orders. At most the items that arrived ahead of a missing key are held.

    Args:
        expected: The keys that will be offered or dropped, e.g. the sampled client ids.

    Attributes:
        pending: The number of items held, waiting for a smaller key.

    Raises:
        ValueError: If ``expected`` repeats a key.
    """

    def __init__(self, expected: Iterable[int]) -> None:
        keys = list(expected)
        if len(set(keys)) != len(keys):
            repeated = sorted({key for key in keys if keys.count(key) > 1})
            raise ValueError(f"expected keys repeat: {repeated}")
        self._keys = sorted(keys)
        self._expected = set(keys)
        self._next = 0  # index in _keys of the smallest unresolved key
        self._resolved: set[int] = set()
        self._held: dict[int, object] = {}
        self._dropped: set[int] = set()

    @property
    def pending(self) -> int:
        return len(self._held)

    @property
    def done(self) -> bool:
        """True when every expected key is resolved and every item released."""
        return self._next == len(self._keys)

    def offer(self, key: int, item: object) -> list[tuple[int, object]]:
        """Hand in the item of ``key``.

        Args:
            key: An expected key not yet offered or dropped.
            item: Anything; it is returned unchanged.

        Returns:
            The ``(key, item)`` pairs now ready, in ascending key order (empty when a smaller
            key is still unresolved).

        Raises:
            ValueError: If ``key`` is not expected or was already offered or dropped.
        """
        self._resolve(key)
        self._held[key] = item
        return self._release()

    def drop(self, key: int) -> list[tuple[int, object]]:
        """Mark ``key`` as never coming, releasing the items it held back.

        Args:
            key: An expected key not yet offered or dropped.

        Returns:
            The ``(key, item)`` pairs now ready, in ascending key order.

        Raises:
            ValueError: If ``key`` is not expected or was already offered or dropped.
        """
        self._resolve(key)
        self._dropped.add(key)
        return self._release()

    def _resolve(self, key: int) -> None:
        if key in self._resolved:
            how = "dropped" if key in self._dropped else "offered"
            raise ValueError(f"key {key} was already {how}")
        if key not in self._expected:
            raise ValueError(f"key {key} is not expected")
        self._resolved.add(key)

    def _release(self) -> list[tuple[int, object]]:
        ready = []
        while self._next < len(self._keys) and self._keys[self._next] in self._resolved:
            key = self._keys[self._next]
            if key in self._held:
                ready.append((key, self._held.pop(key)))
            self._next += 1
        return ready
