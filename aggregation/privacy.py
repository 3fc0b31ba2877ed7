"""Client-level differential privacy (docs/algorithms.md §4b.5-§4b.7): DP-FedAvg's clipping,
noise and budget.

DP-FedAvg (McMahan et al., 2018) clips each client's update ``u_i = x_i - view_i`` to L2 norm
``C``, averages the clipped updates with a fixed denominator and adds Gaussian noise whose
standard deviation is ``z C`` on the *sum* of the clipped updates, per coordinate; ``z`` is
the noise multiplier. Adaptive clipping (Andrew et al., 2021) moves ``C`` geometrically toward
a target quantile of the update norms, from a noised count of unclipped clients, and spends a
share of ``z`` on that count (Theorem 1 of the paper: :func:`update_noise_multiplier`).

- :func:`clip_update`: ``u_i * min(1, C / ||u_i||)`` over all tensors of one update.
- :func:`coverage_counts`, :func:`server_noise_std`, :func:`client_noise_std`: how many
  clients a merge divides each rank dimension by, hence the noise std per dimension that
  makes the noise on the sum ``z C``, added once by the server or in shares by the clients.
- :func:`noise_like`: seeded Gaussian noise shaped like a state dict.
- :func:`adaptive_clip_update`, :func:`update_noise_multiplier`: adaptive clipping.
- :func:`dp_event`, :func:`epsilon_after`, :func:`noise_for_epsilon`: the privacy budget, by
  Google's ``dp_accounting`` library (RDP or PLD accountant); no epsilon formula here.

Pure functions: state dicts, ranks and numbers in, new values out; inputs are never mutated.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from aggregation.lora_keys import rank_axis
from aggregation.stacking import accumulation_dtype

State = Mapping[str, Tensor]
Accountant = Literal["rdp", "pld"]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld")


def _check_same_keys(update: State, origin: State) -> None:
    if set(update) != set(origin):
        missing = sorted(set(update) ^ set(origin))
        raise ValueError(f"update and origin must have the same keys; they differ in {missing}")
    for k in update:
        if update[k].shape != origin[k].shape:
            raise ValueError(
                f"{k}: update has shape {tuple(update[k].shape)}, origin {tuple(origin[k].shape)}"
            )


def clip_update(update: State, origin: State, max_norm: float) -> tuple[dict[str, Tensor], float]:
    """Clip ``update - origin`` to L2 norm ``max_norm`` over all tensors together.

    Args:
        update: A client's tensors after local training (its upload).
        origin: The tensors it started from (same keys and shapes).
        max_norm: The clip norm ``C`` (positive, finite).

    Returns:
        ``(clipped, norm)``: ``origin + u * min(1, C / ||u||)`` with ``u = update - origin``,
        each tensor in ``update``'s dtype (a copy of ``update`` when ``||u|| <= C``), and the
        norm ``||u||`` before clipping (computed in float64 from the float32, or float64,
        difference).

    Raises:
        ValueError: ``max_norm`` is not positive and finite, or the keys or shapes differ.
    """
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be a positive finite number, got {max_norm}")
    _check_same_keys(update, origin)
    diffs = {}
    for k in sorted(update):
        dtype = accumulation_dtype([update[k], origin[k]])
        diffs[k] = update[k].to(dtype) - origin[k].to(dtype)
    norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in diffs.values()))
    if norm <= max_norm:
        return {k: v.clone() for k, v in update.items()}, norm
    scale = max_norm / norm
    clipped = {
        k: (origin[k].to(diffs[k].dtype) + diffs[k] * scale).to(update[k].dtype) for k in update
    }
    return clipped, norm


def coverage_counts(ranks: Sequence[int], global_rank: int, dimensionwise: bool) -> Tensor:
    """How many clients a merge divides each rank dimension by (equal client weights).

    Args:
        ranks: The merged clients' ranks.
        global_rank: The global rank ``R``.
        dimensionwise: True for a merge that averages dimension ``j`` over the clients that
            cover it (FediLoRA, docs/algorithms.md §1.2): ``n_j = #{i : r_i > j}`` (0-based ``j``);
            False for one that divides every dimension by all clients (zero-padding FedAvg):
            ``n`` where some client covers ``j``.

    Returns:
        An int64 tensor of shape ``(R,)``; 0 where no client covers the dimension.

    Raises:
        ValueError: No rank, a rank below 1 or above ``R``.
    """
    if not ranks:
        raise ValueError("need at least one client rank")
    if any(not 1 <= r <= global_rank for r in ranks):
        raise ValueError(f"every rank must be in [1, {global_rank}], got {list(ranks)}")
    client_ranks = torch.as_tensor(list(ranks), dtype=torch.long)
    covers = torch.arange(global_rank)[None, :] < client_ranks[:, None]  # (n, R)
    counts = covers.sum(dim=0)
    if dimensionwise:
        return counts
    return torch.where(counts > 0, len(ranks), 0).to(torch.long)


def server_noise_std(
    ranks: Sequence[int], global_rank: int, sum_std: float, dimensionwise: bool
) -> tuple[Tensor, float]:
    """The server's noise std on the merged tensors that puts ``sum_std`` on the sum.

    A merge with equal weights divides rank dimension ``j`` by ``d_j`` (see
    :func:`coverage_counts`) and dense tensors by the client count ``n``, so noise of std
    ``sum_std / d_j`` on the merged value is noise of std ``sum_std`` on the sum of the
    clipped updates. A dimension no client covers gets none (it carries no client's data).

    Args:
        ranks: The merged clients' ranks.
        global_rank: The global rank ``R``.
        sum_std: The noise std on the sum, ``z C``.
        dimensionwise: Whether the merge averages each dimension over its coverers.

    Returns:
        ``(rank_std, dense_std)``: float64 std per rank dimension, shape ``(R,)``, and the std
        of every coordinate of a dense (non-LoRA) tensor.

    Raises:
        ValueError: ``sum_std`` negative or not finite, or the ranks are invalid.
    """
    _check_std(sum_std)
    counts = coverage_counts(ranks, global_rank, dimensionwise).to(torch.float64)
    rank_std = torch.where(counts > 0, sum_std / counts.clamp(min=1), 0.0)
    return rank_std, sum_std / len(ranks)


def client_noise_std(cohort: Sequence[int], rank: int, sum_std: float) -> tuple[Tensor, float]:
    """One client's share of the noise: the covering clients' shares sum to ``sum_std ** 2``.

    Every client of the round's cohort that covers rank dimension ``j`` adds noise of variance
    ``sum_std ** 2 / n_j``, ``n_j = #{cohort ranks > j}``; dense coordinates ``sum_std ** 2 /
    n``. When every cohort client is merged, the noise on the sum over the clients covering
    ``j`` has std ``sum_std`` exactly, whichever merge divides it afterwards (so zero-padding
    FedAvg needs ``n_j`` here too, not ``n``: only the coverers of ``j`` upload noise for it).

    Args:
        cohort: The ranks of every client sampled this round (public), this client included.
        rank: This client's rank.
        sum_std: The noise std on the sum, ``z C``.

    Returns:
        ``(rank_std, dense_std)``: float64 std per rank dimension, shape ``(rank,)``, and the
        std of a dense coordinate.

    Raises:
        ValueError: An empty cohort, ``sum_std`` invalid, or ``rank`` above every cohort rank.
    """
    _check_std(sum_std)
    if not cohort:
        raise ValueError("the cohort is empty: the client noise share needs the round's ranks")
    if rank < 1 or rank > max(cohort):
        raise ValueError(f"rank {rank} is not covered by the cohort's ranks {list(cohort)}")
    counts = coverage_counts(cohort, max(cohort), dimensionwise=True)[:rank].to(torch.float64)
    return sum_std / counts.sqrt(), sum_std / math.sqrt(len(cohort))


def _check_std(std: float) -> None:
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"a noise std must be a non-negative finite number, got {std}")


def noise_like(
    like: State, rank_std: Tensor, dense_std: float, generator: torch.Generator
) -> dict[str, Tensor]:
    """Gaussian noise shaped like ``like``: std ``rank_std[j]`` on rank dimension ``j`` of each
    LoRA tensor, ``dense_std`` on every coordinate of a dense tensor.

    The noise is drawn key by key in sorted key order, in float32, from ``generator`` (one
    full-shape draw per key even where the std is 0), so the same generator state gives the
    same noise whatever order ``like`` lists its keys in.

    Args:
        like: The tensors to shape the noise after.
        rank_std: Std per rank dimension, at least as long as every LoRA tensor's rank.
        dense_std: Std of a dense coordinate.
        generator: A CPU generator (seeded by the caller).

    Returns:
        A new dict, in sorted key order, of noise tensors in each tensor's dtype and device.

    Raises:
        ValueError: A std is negative or not finite, or a LoRA tensor's rank exceeds
            ``len(rank_std)``.
    """
    _check_std(dense_std)
    rank_std = torch.as_tensor(rank_std, dtype=torch.float64)
    if (
        rank_std.dim() != 1
        or not bool(torch.isfinite(rank_std).all())
        or bool((rank_std < 0).any())
    ):
        raise ValueError("rank_std must be a 1-D tensor of non-negative finite numbers")
    out = {}
    for key in sorted(like):
        tensor = like[key]
        draw = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
        axis = rank_axis(key)
        if axis is None:
            scaled = draw * dense_std
        else:
            r = tensor.shape[axis]
            if r > rank_std.numel():
                raise ValueError(f"{key}: rank {r} exceeds the {rank_std.numel()} stds given")
            shape = [1] * tensor.dim()
            shape[axis] = r
            scaled = draw * rank_std[:r].to(torch.float32).reshape(shape)
        out[key] = scaled.to(dtype=tensor.dtype, device=tensor.device)
    return out


def adaptive_clip_update(
    clip_norm: float, unclipped_fraction: float, target_quantile: float, lr: float
) -> float:
    """Andrew et al.'s geometric update of the clip norm: ``C exp(-lr (b - gamma))``.

    Args:
        clip_norm: This round's clip norm ``C_t`` (positive).
        unclipped_fraction: The noised fraction ``b`` of clients whose update norm was at most
            ``C_t`` (may leave ``[0, 1]`` through the noise).
        target_quantile: The quantile ``gamma`` of the norms to track, in ``(0, 1)``.
        lr: The geometric step size ``eta_C`` (positive).

    Returns:
        ``C_{t+1}``: smaller when more than ``gamma`` of the clients were unclipped.

    Raises:
        ValueError: An argument outside its range or not finite.
    """
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be positive and finite, got {clip_norm}")
    if not math.isfinite(unclipped_fraction):
        raise ValueError(f"unclipped_fraction must be finite, got {unclipped_fraction}")
    if not 0 < target_quantile < 1:
        raise ValueError(f"target_quantile must be in (0, 1), got {target_quantile}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be positive and finite, got {lr}")
    return clip_norm * math.exp(-lr * (unclipped_fraction - target_quantile))


def update_noise_multiplier(noise_multiplier: float, count_std: float) -> float:
    """The update's noise multiplier ``z_delta`` when the count of adaptive clipping takes its
    share: ``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (Andrew et al., 2021, Theorem 1), so
    the update and the count together are one Gaussian mechanism of multiplier ``z``.

    Args:
        noise_multiplier: The combined multiplier ``z`` (0: no noise at all, returns 0).
        count_std: The std ``sigma_b`` of the noise on the count of unclipped clients.

    Returns:
        ``z_delta >= z``.

    Raises:
        ValueError: ``z`` negative or not finite, ``sigma_b`` not positive, or
            ``2 sigma_b <= z`` (the count alone would spend the whole budget).
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(
            f"noise_multiplier must be non-negative and finite, got {noise_multiplier}"
        )
    if noise_multiplier == 0:
        return 0.0
    if not (math.isfinite(count_std) and count_std > 0):
        raise ValueError(f"count_std must be positive and finite, got {count_std}")
    rest = noise_multiplier**-2 - (2 * count_std) ** -2
    if rest <= 0:
        raise ValueError(
            f"the count noise std {count_std} leaves no budget for the update: adaptive "
            f"clipping needs 2 * count_std > noise_multiplier = {noise_multiplier}"
        )
    return rest**-0.5


def _check_accounting(rounds: int, sampling_rate: float, delta: float, accountant: str) -> None:
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def dp_event(sampling_rate: float, noise_multiplier: float, rounds: int):
    """The ``dp_accounting`` event of DP-FedAvg: ``rounds`` compositions of a Gaussian
    mechanism of multiplier ``z`` on a Poisson sample of rate ``q``.

    fedsim samples a fixed number ``n`` of the ``N`` clients without replacement each round;
    Poisson sampling with ``q = n / N`` is the standard approximation of DP-FedAvg papers.

    Args:
        sampling_rate: ``q`` in ``(0, 1]``.
        noise_multiplier: ``z >= 0``.
        rounds: ``T >= 0``.

    Returns:
        A ``dp_accounting.DpEvent``.
    """
    import dp_accounting

    step = dp_accounting.PoissonSampledDpEvent(
        sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
    )
    return dp_accounting.SelfComposedDpEvent(step, rounds)


def _accountant(accountant: str):
    from dp_accounting import pld, rdp

    return rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()


class _DropUnconvergedOrders(logging.Filter):
    """The RDP accountant drops fractional orders whose series does not converge (it logs one
    warning per order and call); the epsilon it returns is unaffected."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


@contextlib.contextmanager
def _quiet_accountant() -> Iterator[None]:
    log = logging.getLogger("absl")
    quiet = _DropUnconvergedOrders()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


def epsilon_after(
    rounds: int,
    sampling_rate: float,
    noise_multiplier: float,
    delta: float,
    accountant: Accountant = "rdp",
) -> float:
    """The epsilon of ``(epsilon, delta)``-DP spent after ``rounds`` rounds of DP-FedAvg.

    Args:
        rounds: Rounds ``T`` so far (0 gives 0).
        sampling_rate: ``q = n / N`` (see :func:`dp_event`).
        noise_multiplier: ``z`` (0 gives infinity).
        delta: ``delta`` in ``(0, 1)``.
        accountant: ``"rdp"`` (Renyi DP) or ``"pld"`` (privacy loss distributions).

    Returns:
        The accountant's epsilon for :func:`dp_event`.

    Raises:
        ValueError: An argument outside its range.
    """
    _check_accounting(rounds, sampling_rate, delta, accountant)
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(
            f"noise_multiplier must be non-negative and finite, got {noise_multiplier}"
        )
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    with _quiet_accountant():
        event = dp_event(sampling_rate, noise_multiplier, rounds)
        return float(_accountant(accountant).compose(event).get_epsilon(delta))


def noise_for_epsilon(
    target_epsilon: float,
    rounds: int,
    sampling_rate: float,
    delta: float,
    accountant: Accountant = "rdp",
    tol: float = 1e-3,
) -> float:
    """The smallest noise multiplier (within ``tol``) whose ``rounds`` rounds spend at most
    ``target_epsilon``, by ``dp_accounting.calibrate_dp_mechanism``.

    Args:
        target_epsilon: The budget ``epsilon > 0`` for the whole run.
        rounds: Rounds ``T >= 1``.
        sampling_rate: ``q = n / N``.
        delta: ``delta`` in ``(0, 1)``.
        accountant: ``"rdp"`` or ``"pld"``.
        tol: Absolute tolerance on ``z``.

    Returns:
        ``z`` with ``epsilon_after(rounds, q, z, delta) <= target_epsilon``.

    Raises:
        ValueError: An argument outside its range.
    """
    import dp_accounting

    _check_accounting(rounds, sampling_rate, delta, accountant)
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1 to calibrate, got {rounds}")
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be positive and finite, got {target_epsilon}")
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be positive and finite, got {tol}")
    with _quiet_accountant():
        z = dp_accounting.calibrate_dp_mechanism(
            lambda: _accountant(accountant),
            lambda z: dp_event(sampling_rate, z, rounds),
            target_epsilon,
            delta,
            tol=tol,
        )
    return float(z)
