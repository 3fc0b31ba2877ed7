"""Server optimisers (docs/algorithms.md §3.1, Reddi et al. 2021) on the pseudo-gradient of one
round.

With ``Δ = aggregate - θ_g`` per key (both in the aligned rank-``R`` space):
- FedAvg: ``θ ← θ + Δ`` (the aggregate itself).
- FedAvgM: ``m ← β1 m + Δ``; ``θ ← θ + η m``.
- FedAdagrad: ``v ← v + Δ²``; ``θ ← θ + η Δ / (sqrt(v) + τ)``.
- FedAdam: ``m ← β1 m + (1-β1) Δ``; ``v ← β2 v + (1-β2) Δ²``; ``θ ← θ + η m / (sqrt(v) + τ)``.
- FedYogi: as FedAdam but ``v ← v - (1-β2) Δ² sign(v - Δ²)``.

Moments start at ``m = 0`` and ``v = τ²`` (Reddi et al. 2021, Algorithm 2: ``v_{-1} >= τ²``), so
the first step divides by ``sqrt(v) + τ`` with ``v`` at least ``τ²``; there is no bias
correction. Moments are kept per key in float32 (float64 if the tensors are) on the tensors'
device. A key seen for the first time, or whose shape changed since its moments were made (e.g.
the global rank grew), starts from fresh moments: old moments of another shape have no
dimension-by-dimension meaning for the new tensor. Moments of keys absent from a step are kept.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from aggregation.stacking import accumulation_dtype

State = dict[str, Tensor]


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value}")


def _check_beta(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def _check_states(global_state: Mapping[str, Tensor], aggregate: Mapping[str, Tensor]) -> None:
    missing = sorted(set(global_state) - set(aggregate))
    extra = sorted(set(aggregate) - set(global_state))
    if missing or extra:
        raise ValueError(
            f"aggregate and global state must have the same keys: missing from aggregate "
            f"{missing}, missing from global state {extra}"
        )
    for key, tensor in aggregate.items():
        if tensor.shape != global_state[key].shape:
            raise ValueError(
                f"{key}: aggregate shape {tuple(tensor.shape)} differs from global shape "
                f"{tuple(global_state[key].shape)}; align both to the global rank first"
            )


class ServerOptimizer:
    """Base class of server optimisers: ``step`` applies one round's pseudo-gradient.

    Subclasses name their moment buffers in ``moments`` and implement ``_update``.

    Attributes:
        name: The config name (the key in ``SERVER_OPTIMIZERS``).
        options: Constructor keyword arguments the optimiser accepts.
        is_identity: True when ``step`` returns the aggregate unchanged (FedAvg), so the
            caller may skip the optimiser and methods that cannot take one still compose.
        moments: Names of the per-key moment buffers kept across rounds.
        steps: How many steps have been taken.
    """

    name: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()
    is_identity: ClassVar[bool] = False
    moments: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.steps = 0
        self._buffers: dict[str, State] = {moment: {} for moment in self.moments}

    def step(self, global_state: Mapping[str, Tensor], aggregate: Mapping[str, Tensor]) -> State:
        """Move the global state along this round's pseudo-gradient ``aggregate - global``.

        Args:
            global_state: The current global state ``θ_g``.
            aggregate: This round's merged client states, same keys and shapes.

        Returns:
            A new dict of new tensors (in ``aggregate``'s key order and each tensor in
            ``global_state``'s dtype); the moments on this instance are updated.

        Raises:
            ValueError: If the two states differ in keys or in a tensor's shape.
        """
        _check_states(global_state, aggregate)
        out: State = {}
        for key, target in aggregate.items():
            theta = global_state[key]
            dtype = accumulation_dtype([theta, target])
            current = theta.to(dtype)
            delta = target.to(device=theta.device, dtype=dtype) - current
            out[key] = self._update(key, current, delta).to(theta.dtype)
        self.steps += 1
        return out

    def _update(self, key: str, theta: Tensor, delta: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement _update")

    def _moment(self, moment: str, key: str, like: Tensor, initial: float = 0.0) -> Tensor:
        """The stored moment of ``key``, or ``initial`` everywhere if it is new or reshaped."""
        stored = self._buffers[moment].get(key)
        if stored is not None and stored.shape == like.shape:
            return stored.to(device=like.device, dtype=like.dtype)
        return torch.full_like(like, initial)

    def _store(self, moment: str, key: str, value: Tensor) -> None:
        self._buffers[moment][key] = value

    def state_dict(self) -> dict[str, Any]:
        """Return the optimiser's state: the step count and a copy of every moment buffer.

        Returns:
            ``{"steps": int, <moment>: {key: tensor}, ...}`` with one entry per name in
            ``moments`` (e.g. ``"m"``, ``"v"``); the tensors are copies.
        """
        state: dict[str, Any] = {"steps": self.steps}
        for moment, buffer in self._buffers.items():
            state[moment] = {key: tensor.clone() for key, tensor in buffer.items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the step count and moments saved by ``state_dict`` (copies are kept).

        Args:
            state: A dict from ``state_dict`` of the same optimiser class.

        Raises:
            ValueError: If ``state`` lacks ``"steps"`` or its moment names differ from
                ``moments``.
        """
        names = set(state) - {"steps"}
        if "steps" not in state or names != set(self.moments):
            raise ValueError(
                f"{type(self).__name__} state needs 'steps' and moments {list(self.moments)}, "
                f"got {sorted(state)}"
            )
        self.steps = int(state["steps"])
        self._buffers = {
            moment: {key: tensor.clone() for key, tensor in state[moment].items()}
            for moment in self.moments
        }


class FedAvg(ServerOptimizer):
    """FedAvg: ``θ ← θ + Δ``, i.e. the new global state is the aggregate itself.

    ``step`` returns copies of the aggregate rather than ``θ + (aggregate - θ)``, which would
    differ from the aggregate by rounding.
    """

    name: ClassVar[str] = "fedavg"
    is_identity: ClassVar[bool] = True

    def step(self, global_state: Mapping[str, Tensor], aggregate: Mapping[str, Tensor]) -> State:
        """Return copies of ``aggregate`` (cast to ``global_state``'s dtypes).

        Args:
            global_state: The current global state.
            aggregate: This round's merged client states, same keys and shapes.

        Returns:
            A new dict of new tensors equal to ``aggregate``.

        Raises:
            ValueError: If the two states differ in keys or in a tensor's shape.
        """
        _check_states(global_state, aggregate)
        self.steps += 1
        return {
            key: tensor.to(device=global_state[key].device, dtype=global_state[key].dtype).clone()
            for key, tensor in aggregate.items()
        }


class FedAvgM(ServerOptimizer):
    """FedAvg with server momentum: ``m ← β1 m + Δ``; ``θ ← θ + η m``.

    Args:
        lr: The server learning rate ``η`` (positive).
        beta1: The momentum ``β1`` in ``[0, 1)``.

    Raises:
        ValueError: If an option is out of range.
    """

    name: ClassVar[str] = "fedavgm"
    options: ClassVar[tuple[str, ...]] = ("lr", "beta1")
    moments: ClassVar[tuple[str, ...]] = ("m",)

    def __init__(self, lr: float = 1.0, beta1: float = 0.9) -> None:
        super().__init__()
        _check_positive("lr", lr)
        _check_beta("beta1", beta1)
        self.lr, self.beta1 = lr, beta1

    def _update(self, key: str, theta: Tensor, delta: Tensor) -> Tensor:
        m = self.beta1 * self._moment("m", key, delta) + delta
        self._store("m", key, m)
        return theta + self.lr * m


class FedAdagrad(ServerOptimizer):
    """FedAdagrad: ``v ← v + Δ²``; ``θ ← θ + η Δ / (sqrt(v) + τ)``.

    Args:
        lr: The server learning rate ``η`` (positive).
        tau: The adaptivity ``τ`` (positive); ``v`` starts at ``τ²``.

    Raises:
        ValueError: If an option is out of range.
    """

    name: ClassVar[str] = "fedadagrad"
    options: ClassVar[tuple[str, ...]] = ("lr", "tau")
    moments: ClassVar[tuple[str, ...]] = ("v",)

    def __init__(self, lr: float = 1e-2, tau: float = 1e-3) -> None:
        super().__init__()
        _check_positive("lr", lr)
        _check_positive("tau", tau)
        self.lr, self.tau = lr, tau

    def _update(self, key: str, theta: Tensor, delta: Tensor) -> Tensor:
        v = self._moment("v", key, delta, self.tau**2) + delta.square()
        self._store("v", key, v)
        return theta + self.lr * delta / (v.sqrt() + self.tau)


class FedAdam(ServerOptimizer):
    """FedAdam: ``m ← β1 m + (1-β1) Δ``; ``v ← β2 v + (1-β2) Δ²``; ``θ += η m / (sqrt(v) + τ)``.

    With ``beta1 = beta2 = 0`` a step is ``θ + η Δ / (|Δ| + τ)``: a sign step of size about ``η``
    where ``|Δ| >> τ``.

    Args:
        lr: The server learning rate ``η`` (positive).
        beta1: The first-moment decay ``β1`` in ``[0, 1)``.
        beta2: The second-moment decay ``β2`` in ``[0, 1)``.
        tau: The adaptivity ``τ`` (positive); ``v`` starts at ``τ²``.

    Raises:
        ValueError: If an option is out of range.
    """

    name: ClassVar[str] = "fedadam"
    options: ClassVar[tuple[str, ...]] = ("lr", "beta1", "beta2", "tau")
    moments: ClassVar[tuple[str, ...]] = ("m", "v")

    def __init__(
        self, lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__()
        _check_positive("lr", lr)
        _check_beta("beta1", beta1)
        _check_beta("beta2", beta2)
        _check_positive("tau", tau)
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau

    def _second_moment(self, v: Tensor, delta: Tensor) -> Tensor:
        return self.beta2 * v + (1 - self.beta2) * delta.square()

    def _update(self, key: str, theta: Tensor, delta: Tensor) -> Tensor:
        m = self.beta1 * self._moment("m", key, delta) + (1 - self.beta1) * delta
        v = self._second_moment(self._moment("v", key, delta, self.tau**2), delta)
        self._store("m", key, m)
        self._store("v", key, v)
        return theta + self.lr * m / (v.sqrt() + self.tau)


class FedYogi(FedAdam):
    """FedYogi: as FedAdam, but ``v ← v - (1-β2) Δ² sign(v - Δ²)`` (``v`` moves additively).

    Args:
        lr: The server learning rate ``η`` (positive).
        beta1: The first-moment decay ``β1`` in ``[0, 1)``.
        beta2: The second-moment decay ``β2`` in ``[0, 1)``.
        tau: The adaptivity ``τ`` (positive); ``v`` starts at ``τ²``.

    Raises:
        ValueError: If an option is out of range.
    """

    name: ClassVar[str] = "fedyogi"

    def _second_moment(self, v: Tensor, delta: Tensor) -> Tensor:
        squared = delta.square()
        return v - (1 - self.beta2) * squared * torch.sign(v - squared)
