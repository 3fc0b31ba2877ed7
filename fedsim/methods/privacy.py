"""Client-level differential privacy: DP-FedAvg (docs/algorithms.md §4b.5-§4b.7; McMahan et al.,
2018).

What one round does (the math is :mod:`aggregation.privacy`):

1. Client ``i``'s update is ``u_i = upload_i - view_i``, ``view_i`` the shared tensors it
   started from (the merge's rank-``r_i`` view of the global adapter, in the ``s = 1``
   space); its norm is the L2 norm over all its shared tensors (its own factors at its own
   rank, and the dense keys).
2. Clipping: ``u_i <- u_i * min(1, C / ||u_i||)``. ``privacy.noise=server``: the server clips
   every upload before the merge. ``privacy.noise=client``: each client clips (and noises, 4)
   before its upload; the server cannot check that and does not try.
3. Equal weights: a client's weight must not depend on its private sample count, so every
   client is merged with weight 1: the merge averages with a fixed denominator.
4. Noise of std ``z_delta C`` on the *sum* of the clipped updates, per coordinate. The merge
   divides rank dimension ``j`` by ``d_j`` clients (zero-padding FedAvg: all ``n`` merged
   clients; FediLoRA: the ``n_j`` clients of rank ``> j``) and dense keys by ``n``, so the
   server adds ``N(0, (z_delta C / d_j)^2)`` to dimension ``j`` of the merged tensors and
   ``N(0, (z_delta C / n)^2)`` to dense ones; a dimension no merged client covers carries no
   client's data and gets no noise. With client noise, each client adds
   ``N(0, (z_delta C)^2 / n_j)`` to dimension ``j < r_i`` of its clipped update, ``n_j`` the
   number of ranks ``> j`` in the round's (public) cohort, and ``(z_delta C)^2 / n`` to dense
   coordinates, so the shares of the clients covering ``j`` sum to ``(z_delta C)^2`` (for
   zero-padding too: only the coverers of ``j`` upload noise for it). A sampled client that
   fails, is late or is rejected takes its share with it: such a round is noised less than
   the accounting assumes. Client noise gives the central guarantee only under secure
   aggregation (the server must see the sum alone); this simulator just sums.
5. Every draw is seeded by ``SeedSequence([seed, stream, counter, id])`` (client noise: stream
   211, the round and the client id; server noise: stream 212 and the count of merges the
   server applied, id 0 for the update and 1 for the count), in float32, key by key in sorted
   key order: the numbers do not depend on the actor count, the arrival order or a resume.
6. Adaptive clipping (Andrew et al., 2021, ``privacy.clipping=adaptive``): the server keeps
   ``C_t`` (checkpointed; broadcast to the clients when they clip). ``b_i = 1`` if
   ``||u_i|| <= C_t``; ``b = (sum_i b_i + N(0, sigma_b^2)) / n``; ``C_{t+1} = C_t
   exp(-clip_lr (b - target_quantile))``; ``sigma_b = privacy.count_noise`` or the sampled
   clients per round / 20. The count takes a share of the noise multiplier: the update's is
   ``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``, so the pair is one Gaussian mechanism of
   multiplier ``z`` (the paper's Theorem 1); fixed clipping has ``z_delta = z``. With client
   noise each client uploads ``b_i`` plus its share ``N(0, sigma_b^2 / n)`` of the count noise.
7. Accounting, by Google's ``dp_accounting``: ``T`` compositions of a Gaussian mechanism of
   multiplier ``z`` on a Poisson sample of rate ``q = n / N`` (RDP accountant, or PLD with
   ``privacy.accountant=pld``). fedsim samples exactly ``n`` clients without replacement;
   Poisson sampling with ``q = n / N`` is the standard approximation of DP-FedAvg papers, and
   ``n``, the merged count and the ranks are treated as public. ``privacy.target_epsilon > 0``
   derives ``z`` for ``rounds`` rounds at ``delta`` once, when the config is loaded; the server
   keeps that ``z`` in its checkpoint, so a resume that adds rounds keeps it and the logged
   epsilon then passes the target. ``privacy/epsilon`` is the epsilon after the rounds the
   server merged so far (a round that merged nothing released nothing and is not counted);
   it is absent when ``z = 0`` (no guarantee).

Logged: ``privacy/epsilon``, ``privacy/clip_norm`` (this round's ``C_t``),
``privacy/noise_multiplier`` (``z``), ``privacy/update_noise_multiplier`` (``z_delta``),
``privacy/clipped`` (clients clipped this round), ``privacy/unclipped_fraction`` (adaptive:
the noised ``b``), and the client columns ``privacy_norm`` (``||u_i||`` before clipping) and
``privacy_clipped``. These logs, like the train loss and the personalised metrics, are the
simulator's and outside the guarantee.

The guarantee covers the global adapter's shared tensors released each round (and anything
computed from them alone: their product ``B_g A_g``, the server optimiser's steps). It does
not cover tensors a sharing policy keeps on the client (they are never released), nor the
merges and methods rejected by :meth:`Privacy.check`, each with its reason.
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from aggregation.privacy import (
    adaptive_clip_update,
    client_noise_std,
    clip_update,
    epsilon_after,
    noise_for_epsilon,
    noise_like,
    server_noise_std,
    update_noise_multiplier,
)
from fedsim.config import limits
from fedsim.data.partition import clients_per_round
from fedsim.errors import ConfigError, RunFailed
from fedsim.messages import ClientReport, State
from fedsim.methods.base import ClientStep, MergeBatch, Method, ServerContext, configured_merger

if TYPE_CHECKING:
    from collections.abc import Sequence

    from aggregation.rank_merger import RankMerger
    from fedsim.config import FedSimConfig

# random streams of (seed, stream, counter, id); see actors.client for 201-204
CLIENT_NOISE_STREAM, SERVER_NOISE_STREAM = 211, 212
_UPDATE, _COUNT = 0, 1  # the server's two draws of a merge


def per_round(cfg: FedSimConfig) -> int:
    """The number ``n`` of clients sampled per round (as the round loop samples them)."""
    return clients_per_round(cfg.clients.num, cfg.clients.fraction)


def sampling_rate(cfg: FedSimConfig) -> float:
    """The accountant's Poisson sampling rate ``q = n / N``."""
    return per_round(cfg) / cfg.clients.num


def count_std(cfg: FedSimConfig) -> float:
    """Adaptive clipping's ``sigma_b``: ``privacy.count_noise``, or ``n / 20``."""
    return cfg.privacy.count_noise or per_round(cfg) / 20


@functools.lru_cache(maxsize=16)
def _calibrated(target: float, rounds: int, q: float, delta: float, accountant: str) -> float:
    # a few seconds (PLD: more); once per process and setting
    return noise_for_epsilon(target, rounds, q, delta, accountant)


def noise_multiplier(cfg: FedSimConfig) -> float:
    """The run's noise multiplier ``z``: ``privacy.noise_multiplier``, or the one derived for
    ``privacy.target_epsilon`` over ``rounds`` rounds (cached per process)."""
    p = cfg.privacy
    if p.target_epsilon > 0 and cfg.rounds >= 1:
        return _calibrated(p.target_epsilon, cfg.rounds, sampling_rate(cfg), p.delta, p.accountant)
    return p.noise_multiplier


def _generator(*entropy: int) -> torch.Generator:
    seq = np.random.SeedSequence(list(entropy))
    return torch.Generator().manual_seed(int(seq.generate_state(1, dtype=np.uint64)[0]))


class Privacy(Method):
    """``privacy.enabled=true``."""

    name: ClassVar[str] = "privacy"
    order: ClassVar[int] = 35
    leading_dimensions: ClassVar[bool] = True

    @classmethod
    def enabled(cls, cfg: FedSimConfig) -> bool:
        return cfg.privacy.enabled

    @classmethod
    def check(cls, cfg: FedSimConfig) -> None:
        p = cfg.privacy
        z_max = limits.MAX_NOISE_MULTIPLIER
        for key, ok, want in (
            ("clip_norm", math.isfinite(p.clip_norm) and p.clip_norm > 0, "> 0"),
            (
                "noise_multiplier",
                math.isfinite(p.noise_multiplier) and 0 <= p.noise_multiplier <= z_max,
                f"in [0, {z_max:g}] (from about 1e6 on the accountants' epsilon is 0)",
            ),
            ("delta", 0 < p.delta < 1, "in (0, 1)"),
            ("target_epsilon", math.isfinite(p.target_epsilon) and p.target_epsilon >= 0, ">= 0"),
            ("target_quantile", 0 < p.target_quantile < 1, "in (0, 1)"),
            ("clip_lr", math.isfinite(p.clip_lr) and p.clip_lr > 0, "> 0"),
            ("count_noise", math.isfinite(p.count_noise) and p.count_noise >= 0, ">= 0"),
        ):
            if not ok:
                raise ConfigError(f"privacy.{key}", f"must be {want}, got {getattr(p, key)}")
        if not p.enabled:
            return
        _check_compatible(cfg)
        if p.target_epsilon > 0 and cfg.rounds >= 1:
            _check_budget(cfg)
        try:
            z = noise_multiplier(cfg)
        except Exception as exc:  # noqa: BLE001 - dp_accounting's calibration, any failure
            raise ConfigError(
                "privacy.target_epsilon",
                f"no noise multiplier found for {p.target_epsilon:g} over rounds={cfg.rounds} "
                f"({type(exc).__name__}: {exc})",
            ) from None
        if z > 0:
            _check_noise(cfg, z)
        if p.clipping == "adaptive" and z > 0:
            sigma = count_std(cfg)
            if 2 * sigma <= z:
                source = (
                    "privacy.count_noise"
                    if p.count_noise
                    else f"the {per_round(cfg)} sampled clients per round / 20"
                )
                raise ConfigError(
                    "privacy.count_noise",
                    f"adaptive clipping spends part of the noise multiplier z={z:.4g} on the "
                    f"count of unclipped clients; the update keeps z_delta = (z^-2 - "
                    f"(2 sigma_b)^-2)^(-1/2), which needs 2 sigma_b > z, but sigma_b={sigma:.4g} "
                    f"({source}); set privacy.count_noise above {z / 2:.4g}",
                )
        if p.clipping == "adaptive":
            _check_clip_steps(cfg)

    # -- the noise this run adds ------------------------------------------------------------
    def _update_multiplier(self, z: float) -> float:
        if self.cfg.privacy.clipping == "adaptive":
            return update_noise_multiplier(z, count_std(self.cfg))
        return z

    # -- client ---------------------------------------------------------------------------
    def before_upload(self, step: ClientStep, update: State) -> State:
        p = self.cfg.privacy
        if p.noise != "client":
            return update
        part = step.broadcast.parts.of(self)
        if part is None:
            raise ValueError(
                "privacy.noise=client: the broadcast holds no clip norm and noise multiplier "
                "(the server runs without privacy.enabled)"
            )
        clip, z_delta, sigma = part["clip_norm"], part["update_noise_multiplier"], part["count_std"]
        origin = step.origin()
        clipped, norm = clip_update(update, {k: origin[k] for k in update}, clip)
        cohort = step.task.cohort
        rank_std, dense_std = client_noise_std(cohort, step.task.rank, z_delta * clip)
        gen = _generator(
            self.cfg.seed, CLIENT_NOISE_STREAM, step.task.round_idx, step.task.client_id
        )
        noise = noise_like(clipped, rank_std, dense_std, gen)
        if p.clipping == "adaptive":  # b_i plus this client's share of the count noise
            share = torch.randn((), generator=gen, dtype=torch.float64) * sigma
            bit = float(norm <= clip) + share / math.sqrt(len(cohort))
            step.upload[self.name] = {"unclipped": bit}  # a 0-d float64 tensor
        step.report[self.name] = {"norm": norm, "clipped": norm > clip}
        return {k: clipped[k] + noise[k] for k in update}

    # -- server ---------------------------------------------------------------------------
    def bind_server(self, server: ServerContext) -> None:
        super().bind_server(server)
        self.clip = float(self.cfg.privacy.clip_norm)
        self.rounds = 0  # merges applied so far: the accountant's T and the noise counter
        self.z = float(noise_multiplier(self.cfg))
        self.dimensionwise = _dimensionwise(type(server.merger))
        self._next_clip: float | None = None

    def broadcast_part(self) -> dict[str, float] | None:
        if self.cfg.privacy.noise != "client":
            return None  # the server clips: the clients need nothing
        return {
            "clip_norm": self.clip,
            "update_noise_multiplier": self._update_multiplier(self.z),
            "count_std": count_std(self.cfg),
        }

    def before_merge(self, batch: MergeBatch) -> None:
        p = self.cfg.privacy
        merge = self.rounds + 1
        batch.clients = [replace(c, num_samples=1) for c in batch.clients]
        n = len(batch.clients)
        if p.noise == "server":
            unclipped = 0
            views: dict[int, State] = {}  # one view per rank, not per client
            for i, meta in enumerate(batch.clients):
                if meta.rank not in views:
                    views[meta.rank] = self.server.merger.redistribute(batch.current, meta.rank)
                view = views[meta.rank]
                update = batch.updates[i]
                batch.updates[i], norm = clip_update(
                    update, {k: view[k] for k in update}, self.clip
                )
                unclipped += norm <= self.clip
                batch.column(meta.client_id, privacy_norm=norm, privacy_clipped=norm > self.clip)
            batch.metrics["privacy/clipped"] = float(n - unclipped)
            count = float(unclipped)
        else:  # the clients' noised bits (their sum is what secure aggregation would give)
            count = sum(_reported_bit(u.parts.of(self)) for u in batch.uploads)
        z = self.z
        batch.metrics["privacy/clip_norm"] = self.clip
        batch.metrics["privacy/noise_multiplier"] = z
        batch.metrics["privacy/update_noise_multiplier"] = self._update_multiplier(z)
        if z > 0:
            batch.metrics["privacy/epsilon"] = epsilon_after(
                merge, sampling_rate(self.cfg), z, p.delta, p.accountant
            )
        if p.clipping == "adaptive":
            if p.noise == "server":
                gen = _generator(self.cfg.seed, SERVER_NOISE_STREAM, merge, _COUNT)
                count += count_std(self.cfg) * float(
                    torch.randn(1, generator=gen, dtype=torch.float64)[0]
                )
            fraction = count / n
            batch.metrics["privacy/unclipped_fraction"] = fraction
            try:
                self._next_clip = adaptive_clip_update(
                    self.clip, fraction, p.target_quantile, p.clip_lr
                )
            except OverflowError:  # exp() of a huge exponent
                self._next_clip = math.inf
            if not 0 < self._next_clip < math.inf:  # beyond the six sigmas the check allows
                raise RunFailed(
                    f"round {merge}: adaptive clipping moved the clip norm from {self.clip:.4g} "
                    f"to {self._next_clip:.4g} (noised unclipped share {fraction:.4g}); lower "
                    "privacy.clip_lr or privacy.count_noise"
                )

    def after_merge(self, batch: MergeBatch, merged: State) -> State:
        if self.cfg.privacy.noise != "server":
            return merged
        z_delta = self._update_multiplier(self.z)
        rank_std, dense_std = server_noise_std(
            batch.ranks, self.server.global_rank, z_delta * self.clip, self.dimensionwise
        )
        gen = _generator(self.cfg.seed, SERVER_NOISE_STREAM, self.rounds + 1, _UPDATE)
        noise = noise_like(merged, rank_std, dense_std, gen)
        return {k: merged[k] + noise[k] for k in merged}

    def after_apply(self, batch: MergeBatch) -> None:
        self.rounds += 1
        if self._next_clip is not None:
            self.clip, self._next_clip = self._next_clip, None

    def state_dict(self) -> dict:
        return {
            "rounds": self.rounds,
            "clip_norm": self.clip,
            "noise_multiplier": self.z,
        }

    def load_state_dict(self, state: dict) -> None:
        self.rounds = int(state["rounds"])
        self.clip = float(state["clip_norm"])
        # the z the run started with, even if a resume changed rounds (target_epsilon)
        self.z = float(state["noise_multiplier"])
        self._next_clip = None

    # -- driver ---------------------------------------------------------------------------
    def round_metrics(self, reports: Sequence[ClientReport]) -> dict[str, float]:
        parts = [r.parts.of(self) for r in reports]
        if self.cfg.privacy.noise != "client" or not any(parts):
            return {}  # the server counts what it clipped
        return {"privacy/clipped": float(sum(bool(p and p["clipped"]) for p in parts))}

    def client_columns(self, report: ClientReport) -> dict[str, Any]:
        part = report.parts.of(self)
        if not part:
            return {}
        return {"privacy_norm": part["norm"], "privacy_clipped": part["clipped"]}


def _z_key(cfg: FedSimConfig) -> str:
    """The key that set the noise multiplier: the budget, or the multiplier itself."""
    return (
        "privacy.target_epsilon" if cfg.privacy.target_epsilon > 0 else "privacy.noise_multiplier"
    )


@functools.lru_cache(maxsize=64)
def _epsilon(rounds: int, q: float, z: float, delta: float, accountant: str) -> float:
    return epsilon_after(rounds, q, z, delta, accountant)  # type: ignore[arg-type]


def _check_budget(cfg: FedSimConfig) -> None:
    """``privacy.target_epsilon`` must be reachable: at the largest noise the run may add
    (z C <= :data:`~fedsim.config.limits.MAX_NOISE_STD`, z <= ``MAX_NOISE_MULTIPLIER``), the
    planned rounds must spend at most the target, else no noise multiplier meets it (and the
    calibration searches for a minute before saying so)."""
    p = cfg.privacy
    z_top = min(limits.MAX_NOISE_MULTIPLIER, limits.MAX_NOISE_STD / p.clip_norm)
    spent = _epsilon(cfg.rounds, sampling_rate(cfg), z_top, p.delta, p.accountant)
    if spent > p.target_epsilon:
        raise ConfigError(
            "privacy.target_epsilon",
            f"{p.target_epsilon:g} cannot be met: even the largest noise allowed (z={z_top:.4g}, "
            f"noise std z x clip_norm <= {limits.MAX_NOISE_STD:g}) spends epsilon={spent:.4g} "
            f"over rounds={cfg.rounds} at delta={p.delta:g}; raise the target, or run fewer "
            "rounds",
        )


def _check_noise(cfg: FedSimConfig, z: float) -> None:
    """The noise multiplier ``z > 0`` the run uses: a noise std ``z C`` the weights can carry,
    within what the accountant evaluates, and the accountant evaluated for the planned rounds
    (so an overflow in it is this error, not a failure after round 1)."""
    p = cfg.privacy
    key = _z_key(cfg)
    source = f"z={z:.4g}" + (
        f" (derived for target_epsilon={p.target_epsilon:g})" if p.target_epsilon > 0 else ""
    )
    if z > limits.MAX_NOISE_MULTIPLIER:
        raise ConfigError(key, f"{source} is above {limits.MAX_NOISE_MULTIPLIER:g}")
    if z * p.clip_norm > limits.MAX_NOISE_STD:
        raise ConfigError(
            "privacy.clip_norm" if p.clip_norm >= z else key,
            f"the noise std z x privacy.clip_norm = {z:.4g} x {p.clip_norm:g} = "
            f"{z * p.clip_norm:.4g} moves a global weight by that much per round; at most "
            f"{limits.MAX_NOISE_STD:g} fits float32 training (see train.lr's bound); lower "
            f"privacy.clip_norm or {key}" + (" (raise the target)" if p.target_epsilon > 0 else ""),
        )
    floor = limits.PLD_MIN_NOISE_MULTIPLIER
    if p.accountant == "pld" and z < floor:
        raise ConfigError(
            key,
            f"{source}: the pld accountant's grid grows as 1/z^2 (z=0.05 takes 2 GB and a "
            f"minute per round, z=0.01 38 GiB); it needs z >= {floor:g}; use "
            "privacy.accountant=rdp",
        )
    if cfg.rounds >= 1:
        try:  # the RDP accountant is fast (< 0.3 s) and fails where the Gaussian math does
            _epsilon(cfg.rounds, sampling_rate(cfg), z, p.delta, "rdp")
        except (ArithmeticError, ValueError) as exc:
            raise ConfigError(
                key,
                f"{source}: the privacy accountant cannot evaluate it over rounds={cfg.rounds} "
                f"({type(exc).__name__}: {exc})",
            ) from None


def _check_clip_steps(cfg: FedSimConfig) -> None:
    """Adaptive clipping's geometric step must keep the clip norm in float32's range: one
    round multiplies C by ``exp(-clip_lr (b - gamma))``, bounded here for ``b`` within six
    standard deviations of its noise (:data:`~fedsim.config.limits.MAX_CLIP_EXPONENT`)."""
    p = cfg.privacy
    n = per_round(cfg)
    spread = max(p.target_quantile, 1 - p.target_quantile) + 6 * count_std(cfg) / n
    exponent = p.clip_lr * spread
    if exponent > limits.MAX_CLIP_EXPONENT:
        # the count noise is the culprit when a modest one (sigma_b <= n / 6) would fit
        quiet = p.clip_lr * (max(p.target_quantile, 1 - p.target_quantile) + 1)
        raise ConfigError(
            "privacy.count_noise" if quiet <= limits.MAX_CLIP_EXPONENT else "privacy.clip_lr",
            f"adaptive clipping multiplies the clip norm by exp(-clip_lr (b - "
            f"target_quantile)) each round; with privacy.clip_lr={p.clip_lr:g} and the count "
            f"noise sigma_b={count_std(cfg):.4g} (privacy.count_noise) on {n} clients per "
            f"round, one round may move it by e^{exponent:.4g}, beyond "
            f"e^{limits.MAX_CLIP_EXPONENT:g}: within rounds the clip norm leaves float32's "
            "range (Andrew et al.: clip_lr=0.2, sigma_b=n/20)",
        )


def _reported_bit(part: Any) -> float:
    """A client's noised ``b_i``; a missing or non-finite one counts 0 (clipped)."""
    try:
        value = float(part["unclipped"])
    except (KeyError, TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) else 0.0


def _dimensionwise(merger: type[RankMerger]) -> bool:
    """Whether the merge averages each rank dimension over its coverers (its ``dp_weights``)."""
    if merger.dp_weights is None:
        raise ValueError(f"{merger.__name__} is not a merge DP-FedAvg composes with")
    return merger.dp_weights == "coverers"


def _check_compatible(cfg: FedSimConfig) -> None:
    """The combinations whose releases the clipped, noised average does not cover: read from
    the merge's capability flags (``dp_weights``, ``dp_refusal``) and from each enabled
    method's :meth:`~fedsim.methods.base.Method.dp_conflict`."""
    from aggregation.registry import MERGERS, merger_class
    from fedsim.config.registry import method_classes

    merger = configured_merger(cfg)
    if merger is not None and merger.dp_weights is None:
        private = [name for name in MERGERS if merger_class(name).dp_weights is not None]
        _reject(
            f"aggregation.method={cfg.aggregation.method} cannot be made private: "
            f"{merger.dp_refusal}; use aggregation.method={' or '.join(private)}"
        )
    if cfg.sharing.policy == "none":
        _reject(
            "sharing.policy=none sends nothing to the server, so nothing is released and "
            "there is nothing to protect; turn privacy off"
        )
    for method in method_classes():
        conflict = method.dp_conflict(cfg) if method.enabled(cfg) else None
        if conflict:
            _reject(conflict)


def _reject(reason: str) -> None:
    raise ConfigError("privacy.enabled", reason)
