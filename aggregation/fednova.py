"""FedNova (docs/algorithms.md §3.4) as a client-side rescaling that a factor-linear merge turns
into FedNova.

With ``p_i = n_i / sum n``, ``τ_i`` client ``i``'s local steps and ``τ_eff = sum_i p_i τ_i``,
each update is rescaled to ``θ̃_i = ref_i + (τ_eff / τ_i)(θ_i - ref_i)``, where ``ref_i`` is the
global view client ``i`` started from (the global state truncated to ``r_i``).

Why this is FedNova: a merge that is linear in the factors with weights ``p_i``
(``RankMerger.linear_in_factors``) maps the rescaled updates to
``sum_i p_i θ̃_i = sum_i p_i ref_i - τ_eff sum_i p_i (ref_i - θ_i) / τ_i``. When every client
starts from ``θ_g`` (equal ranks) the first term is ``θ_g``, so this is exactly FedNova's
``θ_g - τ_eff sum_i p_i (θ_g - θ_i) / τ_i``; with heterogeneous ranks the same holds per
dimension in the zero-padded space, ``θ_g`` being replaced by the merge of the references
(what the merger returns when no client moves). A merge with other per-dimension weights
(FediLoRA, HetLoRA) uses its own weights for the normalised updates in place of ``p_i``. With
equal ``τ_i`` the factor is 1 and the rescaling is the identity, i.e. FedAvg.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from torch import Tensor

from aggregation.stacking import accumulation_dtype


def fednova_rescale(
    updates: Sequence[Mapping[str, Tensor]],
    references: Sequence[Mapping[str, Tensor]],
    steps: Sequence[int],
    num_samples: Sequence[float],
) -> list[dict[str, Tensor]]:
    """Rescale each client's update by ``τ_eff / τ_i`` around the state it started from.

    Args:
        updates: Each client's trained state ``θ_i``.
        references: Each client's starting state ``ref_i``, same keys and shapes as ``θ_i``.
        steps: Each client's number of local steps ``τ_i`` (at least 1).
        num_samples: Each client's number of training samples ``n_i`` (positive).

    Returns:
        One new dict per client, ``ref_i + (τ_eff / τ_i)(θ_i - ref_i)`` per key, each tensor in
        ``θ_i``'s dtype; a client whose factor is exactly 1 gets plain copies of ``θ_i``.

    Raises:
        ValueError: If the lengths differ or are zero, a step count or sample count is not
            positive, or an update's keys or shapes differ from its reference.
    """
    if not len(updates) == len(references) == len(steps) == len(num_samples):
        raise ValueError(
            f"got {len(updates)} updates, {len(references)} references, {len(steps)} step "
            f"counts and {len(num_samples)} sample counts; need one of each per client"
        )
    if not updates:
        raise ValueError("need at least one client")
    for index, (tau, count) in enumerate(zip(steps, num_samples, strict=True)):
        if tau < 1:
            raise ValueError(f"client {index}: steps must be at least 1, got {tau}")
        if not (math.isfinite(count) and count > 0):
            raise ValueError(f"client {index}: num_samples must be positive, got {count}")
    total = math.fsum(num_samples)
    rescaled = []
    for index, (update, reference, tau) in enumerate(zip(updates, references, steps, strict=True)):
        if set(update) != set(reference):
            raise ValueError(f"client {index}: update and reference keys differ")
        # τ_eff / τ_i, with τ_j / τ_i inside the sum so that equal steps give exactly 1.
        factor = math.fsum(n * (t / tau) for n, t in zip(num_samples, steps, strict=True)) / total
        out: dict[str, Tensor] = {}
        for key, theta in update.items():
            ref = reference[key]
            if theta.shape != ref.shape:
                raise ValueError(
                    f"client {index}: {key} has shape {tuple(theta.shape)} but its reference "
                    f"has {tuple(ref.shape)}"
                )
            if factor == 1.0:
                out[key] = theta.clone()
                continue
            dtype = accumulation_dtype([theta, ref])
            start = ref.to(dtype)
            out[key] = (start + factor * (theta.to(dtype) - start)).to(theta.dtype)
        rescaled.append(out)
    return rescaled
