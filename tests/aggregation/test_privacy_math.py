"""DP-FedAvg's math (aggregation.privacy) against slow references and dp_accounting itself."""

from __future__ import annotations

import math

import dp_accounting
import pytest
import torch
from dp_accounting import pld, rdp

from aggregation import pad
from aggregation.privacy import (
    adaptive_clip_update,
    client_noise_std,
    clip_update,
    coverage_counts,
    epsilon_after,
    noise_for_epsilon,
    noise_like,
    server_noise_std,
    update_noise_multiplier,
)

A, B, DENSE = "m.lora_A.weight", "m.lora_B.weight", "head.weight"


def _state(g: torch.Generator, rank: int, dtype=torch.float64, scale: float = 1.0) -> dict:
    return {
        A: scale * torch.randn(rank, 5, generator=g, dtype=dtype),
        B: scale * torch.randn(6, rank, generator=g, dtype=dtype),
        DENSE: scale * torch.randn(3, 6, generator=g, dtype=dtype),
    }


def _norm(update: dict, origin: dict) -> float:
    """The slow way: the flat vector of every difference, in float64."""
    flat = torch.cat([(update[k].double() - origin[k].double()).reshape(-1) for k in update])
    return float(flat.norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("max_norm", [0.1, 1.0, 7.5])
def test_clipping_bounds_the_norm_and_keeps_the_direction(dtype, max_norm):
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        origin = _state(g, 4, dtype)
        update = {k: v + d for (k, v), d in zip(origin.items(), _state(g, 4, dtype).values())}
        scale = 10 ** (trial % 5 - 2)  # norms from ~0.05 to ~500
        update = {k: origin[k] + scale * (update[k] - origin[k]) for k in update}
        clipped, norm = clip_update(update, origin, max_norm)
        reference = _norm(update, origin)
        assert norm == pytest.approx(reference, rel=1e-6)
        assert _norm(clipped, origin) <= max_norm + 1e-6
        if reference <= max_norm:
            assert all(torch.equal(clipped[k], update[k]) for k in update)
            continue
        assert _norm(clipped, origin) == pytest.approx(max_norm, rel=1e-5)
        for k in update:  # u * C / ||u||: the same direction, shrunk
            expected = origin[k].double() + (update[k].double() - origin[k].double()) * (
                max_norm / reference
            )
            torch.testing.assert_close(clipped[k].double(), expected, rtol=1e-5, atol=1e-6)
            assert clipped[k].dtype == dtype


def test_clipping_never_mutates_its_inputs_and_rejects_bad_ones():
    g = torch.Generator().manual_seed(1)
    origin, update = _state(g, 2), _state(g, 2)
    saved = {k: v.clone() for k, v in update.items()}
    clip_update(update, origin, 0.5)
    assert all(torch.equal(update[k], saved[k]) for k in update)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="max_norm"):
            clip_update(update, origin, bad)
    with pytest.raises(ValueError, match="same keys"):
        clip_update(update, {A: origin[A]}, 1.0)
    with pytest.raises(ValueError, match="shape"):
        clip_update(update, {**origin, A: origin[A][:1]}, 1.0)


@pytest.mark.parametrize("dimensionwise", [True, False])
def test_coverage_counts_match_a_loop(dimensionwise):
    g = torch.Generator().manual_seed(2)
    for _ in range(50):
        global_rank = int(torch.randint(1, 12, (1,), generator=g))
        n = int(torch.randint(1, 8, (1,), generator=g))
        ranks = [int(r) for r in torch.randint(1, global_rank + 1, (n,), generator=g)]
        counts = coverage_counts(ranks, global_rank, dimensionwise)
        for j in range(global_rank):
            covering = sum(1 for r in ranks if r > j)
            expected = covering if dimensionwise else (len(ranks) if covering else 0)
            assert int(counts[j]) == expected
    with pytest.raises(ValueError):
        coverage_counts([3, 9], 8, True)
    with pytest.raises(ValueError):
        coverage_counts([], 8, True)


def _big_like(rank: int, width: int = 50_000) -> dict:
    """A state whose every rank dimension has 2 * width coordinates (A row and B column)."""
    return {
        A: torch.zeros(rank, width),
        B: torch.zeros(width, rank),
        DENSE: torch.zeros(200_000),
    }


def _dim_values(noise: dict, j: int) -> torch.Tensor:
    return torch.cat([noise[A][j].double(), noise[B][:, j].double()])


@pytest.mark.parametrize("dimensionwise", [True, False])
def test_server_noise_has_the_configured_std_per_dimension(dimensionwise):
    ranks, global_rank, z, clip = [8, 4, 4, 2], 10, 1.3, 0.7
    rank_std, dense_std = server_noise_std(ranks, global_rank, z * clip, dimensionwise)
    like = _big_like(global_rank)
    noise = noise_like(like, rank_std, dense_std, torch.Generator().manual_seed(3))
    assert list(noise) == sorted(like)
    for j in range(global_rank):
        covering = sum(r > j for r in ranks)
        divisor = covering if dimensionwise else len(ranks)
        values = _dim_values(noise, j)
        if covering == 0:  # no client's data in it: no noise
            assert float(rank_std[j]) == 0 and bool((values == 0).all())
            continue
        expected = z * clip / divisor
        assert float(rank_std[j]) == pytest.approx(expected)
        assert float(values.std()) == pytest.approx(expected, rel=0.01)
        assert abs(float(values.mean())) < 5 * expected / math.sqrt(values.numel())
    assert dense_std == pytest.approx(z * clip / len(ranks))
    assert float(noise[DENSE].double().std()) == pytest.approx(dense_std, rel=0.01)


def test_client_noise_shares_sum_to_the_noise_on_the_sum():
    """Every cohort client draws its share; summed over the clients covering a dimension the
    noise has std z C on every covered dimension (the merge then divides by its count)."""
    cohort, z, clip = [8, 4, 4, 2, 2], 0.9, 1.5
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in _big_like(8).items()}
    for cid, rank in enumerate(cohort):
        rank_std, dense_std = client_noise_std(cohort, rank, z * clip)
        for j in range(rank):
            assert float(rank_std[j]) == pytest.approx(
                z * clip / math.sqrt(sum(r > j for r in cohort))
            )
        share = noise_like(_big_like(rank), rank_std, dense_std, torch.Generator().manual_seed(cid))
        total = {k: total[k] + v.double() for k, v in pad(share, 8).items()}
    for j in range(8):
        assert float(_dim_values(total, j).std()) == pytest.approx(z * clip, rel=0.01)
    assert float(total[DENSE].std()) == pytest.approx(z * clip, rel=0.01)
    with pytest.raises(ValueError, match="cohort"):
        client_noise_std([], 2, 1.0)
    with pytest.raises(ValueError, match="not covered"):
        client_noise_std([2, 4], 8, 1.0)


def test_noise_is_deterministic_for_the_seed_and_independent_of_key_order():
    like = _state(torch.Generator().manual_seed(4), 4, torch.float32)
    rank_std, dense_std = torch.tensor([1.0, 0.5, 0.25, 0.0]), 2.0
    first = noise_like(like, rank_std, dense_std, torch.Generator().manual_seed(11))
    again = noise_like(
        dict(reversed(like.items())), rank_std, dense_std, torch.Generator().manual_seed(11)
    )
    other = noise_like(like, rank_std, dense_std, torch.Generator().manual_seed(12))
    assert all(torch.equal(first[k], again[k]) for k in like)
    assert not torch.equal(first[A], other[A])
    assert bool((first[A][3] == 0).all()) and bool((first[B][:, 3] == 0).all())
    assert all(first[k].dtype == like[k].dtype for k in like)
    with pytest.raises(ValueError, match="exceeds"):
        noise_like(like, rank_std[:2], dense_std, torch.Generator())
    with pytest.raises(ValueError):
        noise_like(like, rank_std, -1.0, torch.Generator())


def test_the_adaptive_clip_follows_the_geometric_update():
    # by hand: C exp(-eta (b - gamma))
    assert adaptive_clip_update(2.0, 0.8, 0.5, 0.2) == pytest.approx(2.0 * math.exp(-0.2 * 0.3))
    assert adaptive_clip_update(2.0, 0.1, 0.5, 0.2) == pytest.approx(2.0 * math.exp(0.2 * 0.4))
    assert adaptive_clip_update(3.0, 0.5, 0.5, 1.0) == 3.0
    # the noise may push the fraction outside [0, 1]: still the same formula
    assert adaptive_clip_update(1.0, -0.2, 0.5, 0.2) == pytest.approx(math.exp(0.14))
    for args in (
        (0.0, 0.5, 0.5, 0.2),
        (1.0, 0.5, 1.0, 0.2),
        (1.0, 0.5, 0.5, 0.0),
        (1.0, math.nan, 0.5, 0.2),
    ):
        with pytest.raises(ValueError):
            adaptive_clip_update(*args)


def test_the_update_noise_multiplier_leaves_z_for_the_pair():
    assert update_noise_multiplier(1.0, 2.0) == pytest.approx((1 - 1 / 16) ** -0.5)
    for z, sigma in ((0.5, 1.0), (1.0, 2.0), (3.0, 10.0)):
        z_delta = update_noise_multiplier(z, sigma)
        # Andrew et al., Theorem 1: (z_delta^-2 + (2 sigma_b)^-2)^(-1/2) = z
        assert (z_delta**-2 + (2 * sigma) ** -2) ** -0.5 == pytest.approx(z)
        assert z_delta > z
    assert update_noise_multiplier(0.0, 1.0) == 0.0
    with pytest.raises(ValueError, match="2 \\* count_std"):
        update_noise_multiplier(1.0, 0.5)
    with pytest.raises(ValueError):
        update_noise_multiplier(1.0, 0.0)


def _library_epsilon(accountant, q: float, z: float, rounds: int, delta: float) -> float:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds
    )
    return accountant.compose(event).get_epsilon(delta)


@pytest.mark.parametrize(("name", "make"), [("rdp", rdp.RdpAccountant), ("pld", pld.PLDAccountant)])
def test_epsilon_is_the_library_value(name, make):
    expected = _library_epsilon(make(), 0.4, 1.1, 10, 1e-5)
    assert epsilon_after(10, 0.4, 1.1, 1e-5, name) == expected
    assert 1 < expected < 20  # a sane budget for these settings


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    eps = [epsilon_after(t, 0.3, 1.0, 1e-5) for t in range(0, 7)]
    assert eps[0] == 0.0
    assert all(a < b for a, b in zip(eps, eps[1:]))
    assert epsilon_after(5, 0.3, 2.0, 1e-5) < epsilon_after(5, 0.3, 1.0, 1e-5)
    assert epsilon_after(3, 0.3, 0.0, 1e-5) == math.inf
    for args in (
        (-1, 0.3, 1.0, 1e-5),
        (2, 0.0, 1.0, 1e-5),
        (2, 0.3, 1.0, 1.0),
        (2, 0.3, -1.0, 1e-5),
    ):
        with pytest.raises(ValueError):
            epsilon_after(*args)
    with pytest.raises(ValueError, match="accountant"):
        epsilon_after(2, 0.3, 1.0, 1e-5, "moments")


def test_the_derived_noise_spends_at_most_the_target():
    target, rounds, q, delta = 3.0, 10, 0.4, 1e-5
    z = noise_for_epsilon(target, rounds, q, delta, tol=1e-3)
    assert epsilon_after(rounds, q, z, delta) <= target
    # and not much more noise than needed: a little less noise overspends
    assert epsilon_after(rounds, q, z - 2e-3, delta) > target
    assert epsilon_after(rounds, q, z, delta) == pytest.approx(target, rel=0.01)
    with pytest.raises(ValueError):
        noise_for_epsilon(0.0, rounds, q, delta)
    with pytest.raises(ValueError):
        noise_for_epsilon(target, 0, q, delta)
