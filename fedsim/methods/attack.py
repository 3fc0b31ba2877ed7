"""Malicious clients: ``faults.malicious`` run ``faults.attack`` (seeded, fixed for the run).

The attacks a robust rule must survive, on what leaves the client (``before_upload``, after
every honest method's hooks, so the attacker forges the final upload) or on its data:

- ``scale``: the update times ``k`` (``faults.attack_scale``): ``x_0 + k (x - x_0)``, where
  ``x_0`` is what the client started from and ``x`` its trained factors (``s = 1`` space).
- ``sign_flip``: minus the update, ``x_0 - (x - x_0)``.
- ``gaussian``: an update of pure Gaussian noise with norm ``faults.attack_norm``, seeded by
  (seed, round, client).
- ``label_flip``: data poisoning; the client trains on labels ``y -> C - 1 - y`` and uploads
  what that training gives (its held-out metrics still use the true labels).
- ``lie_about_rank``: the factors zero-padded (or truncated) to claim rank
  ``faults.claimed_rank``; the server believes the claim, so under a dimension-wise merge the
  padded zeros weigh on dimensions the client never trained.

Which clients attacked is logged every round: ``faults/attackers`` and the client table's
``attacker`` column.

The formulas: docs/algorithms.md §4b.8.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from aggregation import pad, truncate
from fedsim.config import limits
from fedsim.config.strict import ascii_float, ascii_int
from fedsim.errors import ConfigError
from fedsim.messages import ClientReport, State
from fedsim.methods.base import ClientStep, Method

if TYPE_CHECKING:
    from fedsim.config import FedSimConfig

# random streams of (seed, stream, ...): which clients are malicious; a Gaussian attack's noise
_MALICIOUS, _NOISE = 207, 208
_FORGING = ("scale", "sign_flip", "gaussian")


def malicious_clients(cfg: FedSimConfig) -> list[int]:
    """The malicious client ids of ``faults.malicious``, sorted.

    The spec is a list of ids (``"3,7"``) or a share of the clients (``"0.3"``: that many of
    the ``N`` clients, rounded, chosen by the seed); empty: none.

    Raises:
        ConfigError: a malformed spec, an id outside ``[0, N)``, a share that picks no client.
    """
    spec = str(cfg.faults.malicious).strip()
    n = cfg.clients.num
    if not spec:
        return []
    if "." in spec and "," not in spec:
        share = ascii_float(spec)
        if share is None or not 0 < share <= 1:
            raise ConfigError("faults.malicious", f"a share must be in (0, 1], got {spec!r}")
        count = int(round(share * n))
        if count < 1:
            raise ConfigError(
                "faults.malicious",
                f"a share of {share} of {n} clients picks no client; give at least {1 / n:.3g}",
            )
        from fedsim.data.partition import rng_for

        picked = rng_for(cfg.seed, _MALICIOUS).choice(n, size=count, replace=False)
        return sorted(int(c) for c in picked)
    ids = []
    for part in spec.split(","):
        cid = ascii_int(part)
        if cid is None or part.strip()[:1] in "+-":  # ASCII digits only: "²" is no id
            raise ConfigError(
                "faults.malicious",
                f"expected client ids like '3,7' or a share like '0.1', got {spec!r}",
            )
        if cid >= n:
            raise ConfigError("faults.malicious", f"client id {cid} is not in [0, {n})")
        ids.append(cid)
    if len(set(ids)) != len(ids):
        raise ConfigError("faults.malicious", f"client ids repeat in {spec!r}")
    return sorted(ids)


def claimed_rank(cfg: FedSimConfig, rank: int, global_rank: int) -> int:
    """The rank a ``lie_about_rank`` client of rank ``rank`` claims."""
    if cfg.faults.claimed_rank > 0:
        return cfg.faults.claimed_rank
    return global_rank if rank < global_rank else max(1, rank // 2)


def gaussian_update(update: State, norm: float, seed: int, round_idx: int, client: int) -> State:
    """Gaussian noise shaped like ``update``, scaled to ``norm`` over all its tensors.

    Drawn key by key in sorted order from a generator seeded by (seed, round, client), in
    float32, so the same task forges the same update on any actor.
    """
    seq = np.random.SeedSequence([seed, _NOISE, round_idx, client])
    gen = torch.Generator().manual_seed(int(seq.generate_state(1)[0]))
    noise = {k: torch.randn(update[k].shape, generator=gen) for k in sorted(update)}
    total = float(sum(v.double().pow(2).sum() for v in noise.values())) ** 0.5
    return {k: noise[k] * (norm / total) for k in update}


class Attack(Method):
    """``faults.attack`` (with ``faults.malicious``)."""

    name: ClassVar[str] = "attack"
    order: ClassVar[int] = 90

    def __init__(self, cfg: FedSimConfig):
        from fedsim.config.ranks import resolve_ranks

        super().__init__(cfg)
        self.malicious = set(malicious_clients(cfg))
        self.global_rank = max(resolve_ranks(cfg.clients, cfg.seed))

    @classmethod
    def enabled(cls, cfg: FedSimConfig) -> bool:
        return cfg.faults.attack != "none"

    @classmethod
    def check(cls, cfg: FedSimConfig) -> None:
        f = cfg.faults
        ids = malicious_clients(cfg)
        if f.attack == "none" and ids:
            raise ConfigError(
                "faults.attack",
                f"faults.malicious={f.malicious!r} names malicious clients but faults.attack is "
                "none; choose scale, sign_flip, gaussian, label_flip or lie_about_rank",
            )
        if f.attack != "none" and not ids:
            raise ConfigError(
                "faults.malicious",
                f"faults.attack={f.attack} needs malicious clients: their ids ('3,7') or a "
                "share ('0.1')",
            )
        top = limits.MAX_ATTACK
        if not (np.isfinite(f.attack_scale) and 0 < abs(f.attack_scale) <= top):
            raise ConfigError(
                "faults.attack_scale",
                f"must be non-zero and in [-{top:g}, {top:g}] (a larger forged update "
                f"overflows float32 and is rejected before any robust rule sees it), "
                f"got {f.attack_scale:g}",
            )
        if not (np.isfinite(f.attack_norm) and 0 < f.attack_norm <= top):
            raise ConfigError(
                "faults.attack_norm",
                f"must be positive and at most {top:g}, got {f.attack_norm:g}",
            )
        if f.claimed_rank < 0:
            raise ConfigError("faults.claimed_rank", f"must be >= 0, got {f.claimed_rank}")
        if f.attack == "lie_about_rank" and f.claimed_rank > 0:
            from fedsim.config.ranks import resolve_ranks

            top = max(resolve_ranks(cfg.clients, cfg.seed))
            if f.claimed_rank > top:
                raise ConfigError(
                    "faults.claimed_rank",
                    f"{f.claimed_rank} is above the global rank {top}; the server would "
                    "reject every such upload as malformed, not be fooled by it",
                )
        if f.attack == "label_flip":
            from fedsim.config.checks import is_generative

            if is_generative(cfg):
                from fedsim.tasks.generation import target_kind

                if target_kind(cfg.data) != "label":
                    raise ConfigError(
                        "faults.attack",
                        "label_flip needs class labels; this generation task answers free "
                        "text (captions)",
                    )

    # -- client ---------------------------------------------------------------------------
    def _attacks(self, step: ClientStep) -> bool:
        return step.task.client_id in self.malicious

    def before_training(self, step: ClientStep) -> None:
        if self.cfg.faults.attack == "label_flip" and self._attacks(step):
            flip = np.arange(step.num_classes - 1, -1, -1)
            step.train = step.train.relabelled(flip)

    def before_upload(self, step: ClientStep, update: State) -> State:
        if not self._attacks(step):
            return update
        attack, f = self.cfg.faults.attack, self.cfg.faults
        step.report[self.name] = attack
        if attack in _FORGING:
            origin = step.origin()
            if attack == "gaussian":
                noise = gaussian_update(
                    update, f.attack_norm, self.cfg.seed, step.task.round_idx, step.task.client_id
                )
                return {k: (origin[k].float() + noise[k]).to(update[k].dtype) for k in update}
            k = f.attack_scale if attack == "scale" else -1.0
            return {
                key: (origin[key].float() + k * (v.float() - origin[key].float())).to(v.dtype)
                for key, v in update.items()
            }
        if attack == "lie_about_rank":
            rank = step.task.rank
            claim = claimed_rank(self.cfg, rank, self.global_rank)
            step.upload_rank = claim
            return pad(update, claim) if claim > rank else truncate(update, claim)
        return update  # label_flip: the poisoned training made the update

    # -- driver ---------------------------------------------------------------------------
    def round_metrics(self, reports: Sequence[ClientReport]) -> dict[str, float]:
        return {"faults/attackers": float(sum(r.parts.of(self) is not None for r in reports))}

    def client_columns(self, report: ClientReport) -> dict[str, Any]:
        return {"attacker": report.parts.of(self) or ""}
