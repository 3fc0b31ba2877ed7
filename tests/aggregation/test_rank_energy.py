"""The global adapter's energy per rank band (aggregation/diagnostics.py, docs/algorithms.md
§6.1): the singular values from the factors against a dense SVD, the band shares against a loop,
and rank collapse under zero-padding, FlexLoRA and FediLoRA with local training replaced by the
identity, checked against the shrink factors (6.1.4)-(6.1.6) over several rounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lora_builders import build_state, lora_a, lora_b

from aggregation import get_merger
from aggregation.diagnostics import (
    energy_metrics,
    product_singular_values,
    rank_bands,
    rank_energy,
)

# -- slow references ------------------------------------------------------------------------------


def _dense_product(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """``B @ A`` by an explicit triple loop in Python floats (1x1 conv factors flattened)."""
    a2 = a.reshape(a.shape[0], -1).tolist()
    b2 = b.reshape(b.shape[0], b.shape[1]).tolist()
    r, k, d = len(a2), len(a2[0]), len(b2)
    return np.array(
        [[sum(b2[i][m] * a2[m][j] for m in range(r)) for j in range(k)] for i in range(d)]
    )


def _dense_sq_singular_values(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """The squared singular values of the dense product (numpy's SVD, float64), descending."""
    return [float(s) ** 2 for s in np.linalg.svd(_dense_product(a, b), compute_uv=False)]


def _shares_by_loop(sq: list[float], levels: list[int], rank: int) -> list[float]:
    """Share of each band ``r_(m-1)+1 .. r_(m)`` (1-based j) of ``sum_j sq_j``, one j at a
    time (6.1.1)."""
    edges = [0] + sorted({v for v in levels if v < rank}) + [rank]
    energy = []
    for lo, hi in zip(edges, edges[1:]):
        e = 0.0
        for j in range(1, len(sq) + 1):
            if lo < j <= hi:
                e += sq[j - 1]
        energy.append(e)
    total = sum(energy)
    return [e / total if total > 0 else 0.0 for e in energy]


def _adapter_shares_by_loop(state, modules, levels, rank) -> list[float]:
    """(6.1.2): every module's band energies from the dense SVD, summed over modules, then
    divided by their total."""
    total = None
    for module in modules:
        sq = _dense_sq_singular_values(state[lora_a(module)], state[lora_b(module)])
        weights = _shares_by_loop(sq, levels, rank)
        energy = [w * sum(sq) for w in weights]
        total = energy if total is None else [x + y for x, y in zip(total, energy)]
    s = sum(total)
    return [e / s for e in total]


# -- singular values and bands --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("d", "r", "k", "conv"),
    [(7, 4, 5, False), (3, 6, 9, False), (9, 6, 2, False), (6, 5, 4, True), (5, 8, 5, False)],
)
def test_product_singular_values_equal_the_dense_svd(d, r, k, conv):
    # (6.1.3): from the QRs of the factors, against numpy's SVD of the looped dense product
    g = torch.Generator().manual_seed(d * 100 + r * 10 + k)
    tail = (1, 1) if conv else ()
    a = torch.randn(r, k, *tail, generator=g, dtype=torch.float64)
    b = torch.randn(d, r, *tail, generator=g, dtype=torch.float64)
    got = product_singular_values(a, b)
    assert got.dtype == torch.float64 and got.shape == (min(d, r, k),)
    expected = np.sqrt(_dense_sq_singular_values(a, b))[: min(d, r, k)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)
    # float32 factors give the same values to float32 precision
    got32 = product_singular_values(a.float(), b.float())
    np.testing.assert_allclose(got32.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_rank_deficient_and_zero_products():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(8, 2, generator=g, dtype=torch.float64)
    b = torch.cat([b, b[:, :1] * 3.0, torch.zeros(8, 1, dtype=torch.float64)], dim=1)  # rank 2
    a = torch.randn(4, 6, generator=g, dtype=torch.float64)
    got = product_singular_values(a, b)
    expected = np.sqrt(_dense_sq_singular_values(a, b))[:4]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-9)
    assert float(got[2:].abs().max()) < 1e-9
    zero = product_singular_values(a, torch.zeros(8, 4, dtype=torch.float64))
    assert torch.equal(zero, torch.zeros(4, dtype=torch.float64))


def test_rank_bands_follow_the_federations_distinct_ranks():
    assert rank_bands([8, 8, 4, 4, 2, 2], 8) == [(1, 2), (3, 4), (5, 8)]
    assert rank_bands([32, 32, 16, 16, 8, 8, 4, 4, 4, 4], 32) == [
        (1, 4),
        (5, 8),
        (9, 16),
        (17, 32),
    ]
    assert rank_bands([16], 16) == [(1, 16)]  # equal ranks: one band
    assert rank_bands([4, 16], 20) == [(1, 4), (5, 16), (17, 20)]  # up to the global rank


def test_band_shares_match_the_loop_per_module_and_summed_over_the_adapter():
    state = build_state(8, seed=5, dtype=torch.float64)
    modules = [k[: -len(".lora_A.weight")] for k in state if k.endswith("lora_A.weight")]
    levels = [8, 8, 4, 4, 2, 2]
    energy = rank_energy(state, levels, 8)
    assert energy["bands"] == ["1-2", "3-4", "5-8"]
    assert list(energy["modules"]) == modules
    for module in modules:
        sq = _dense_sq_singular_values(state[lora_a(module)], state[lora_b(module)])
        got = energy["modules"][module]
        assert got["share"] == pytest.approx(_shares_by_loop(sq, levels, 8), rel=1e-9, abs=1e-12)
        assert got["energy"] == pytest.approx(sum(sq), rel=1e-9)
    expected = _adapter_shares_by_loop(state, modules, levels, 8)
    assert energy["share"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # summed over modules, then divided: not the mean of the modules' shares
    mean = [sum(energy["modules"][m]["share"][b] for m in modules) / 3 for b in range(3)]
    assert not energy["share"] == pytest.approx(mean, rel=1e-6)
    assert sum(energy["share"]) == pytest.approx(1.0)
    metrics = energy_metrics(energy)
    assert metrics == {
        "merge/energy_share_band_1-2": energy["share"][0],
        "merge/energy_share_band_3-4": energy["share"][1],
        "merge/energy_share_band_5-8": energy["share"][2],
        "merge/rank_collapse": energy["share"][0],
    }


def test_zero_energy_gives_zero_shares_and_one_factor_gives_nothing():
    state = build_state(4, seed=1, dtype=torch.float64)
    zero = {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in state.items()}
    energy = rank_energy(zero, [2, 4], 4)
    assert energy["share"] == [0.0, 0.0] and energy["energy"] == [0.0, 0.0]
    only_a = {k: v for k, v in state.items() if ".lora_B." not in k}  # sharing.policy=A
    assert rank_energy(only_a, [2, 4], 4) is None
    assert energy_metrics(None) == {}


# -- rank collapse with the identity as local training ----------------------------------------

R = 8
LEVELS = [2, 4, 8]
CLIENT_RANKS = [8, 8, 4, 4, 2, 2, 4]
CLIENT_SAMPLES = [10, 30, 20, 5, 35, 15, 25]
# the clients each round merges; the last round samples no rank-8 client (dimensions 5-8
# uncovered), the one before no rank-2 client
ROUNDS = [[0, 2, 4], [1, 3, 5, 6], [0, 1, 3, 6], [2, 4, 6]]
# module -> (d, k, conv); both at least R so the global rank fits every module
SHAPES = {"m.q": (10, 9, False), "m.v": (12, 8, False), "m.conv": (9, 11, True)}


def _initial_global() -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """A rank-8 global adapter in balanced SVD form, ``B = U diag(sqrt s)``,
    ``A = diag(sqrt s) V^T`` with orthonormal ``U``, ``V`` and distinct decreasing ``s``, so
    dimension j is singular direction j and a truncation is the top-r SVD truncation."""
    g = torch.Generator().manual_seed(3)
    state, svd = {}, {}
    for i, (module, (d, k, conv)) in enumerate(SHAPES.items()):
        u = torch.linalg.qr(torch.randn(d, R, generator=g, dtype=torch.float64)).Q
        v = torch.linalg.qr(torch.randn(k, R, generator=g, dtype=torch.float64)).Q
        s = torch.tensor([6.0, 4.5, 3.5, 2.6, 2.0, 1.5, 1.1, 0.8], dtype=torch.float64) * (i + 1)
        tail = (1, 1) if conv else ()
        state[lora_a(module)] = (s.sqrt()[:, None] * v.T).reshape(R, k, *tail)
        state[lora_b(module)] = (u * s.sqrt()[None, :]).reshape(d, R, *tail)
        svd[module] = (u, s, v)
    return state, svd


def _covered_share(clients: list[int]) -> list[float]:
    """``N_j / N`` of one round for j = 1..R (1-based), one client at a time."""
    n = sum(CLIENT_SAMPLES[i] for i in clients)
    return [
        sum(CLIENT_SAMPLES[i] for i in clients if CLIENT_RANKS[i] >= j) / n for j in range(1, R + 1)
    ]


def _identity_rounds(method: str):
    """Run ``ROUNDS`` with the real merger: each client returns exactly the truncation of the
    global adapter it received. Yields (round, clients, global adapter after the round)."""
    merger = get_merger(method, **({"svd": "exact"} if method == "flexlora" else {}))
    state, _ = _initial_global()
    for t, clients in enumerate(ROUNDS, 1):
        ranks = [CLIENT_RANKS[i] for i in clients]
        uploads = [merger.redistribute(state, r) for r in ranks]  # training = identity
        samples = [CLIENT_SAMPLES[i] for i in clients]
        state = merger.merge(uploads, ranks, samples, previous=state, global_rank=R)
        yield t, clients, state


def _expected_singular_values(method: str, upto: int) -> dict[str, list[float]]:
    """sigma_j after ``upto`` rounds from (6.1.4)-(6.1.6): FediLoRA keeps it, FlexLoRA
    multiplies it by N_j/N per round, zero-padding by (N_j/N)^2 per round."""
    _, svd = _initial_global()
    power = {"fedilora": 0, "flexlora": 1, "zeropad": 2}[method]
    out = {}
    for module, (_, s, _) in svd.items():
        sig = s.tolist()
        for clients in ROUNDS[:upto]:
            c = _covered_share(clients)
            sig = [sig[j] * c[j] ** power for j in range(R)]
        out[module] = sig
    return out


def _expected_shares(sig: dict[str, list[float]]) -> list[float]:
    energy = [0.0] * len(LEVELS)
    for values in sig.values():
        sq = sorted((v * v for v in values), reverse=True)
        module_total = sum(sq)
        for b, w in enumerate(_shares_by_loop(sq, LEVELS, R)):
            energy[b] += w * module_total
    total = sum(energy)
    return [e / total for e in energy]


@pytest.mark.parametrize("method", ["fedilora", "zeropad", "flexlora"])
def test_identity_training_shrinks_dimensions_by_the_predicted_factors(method):
    _, svd = _initial_global()
    initial_shares = _expected_shares(_expected_singular_values("fedilora", 0))
    for t, _, state in _identity_rounds(method):
        sig = _expected_singular_values(method, t)
        energy = rank_energy(state, LEVELS, R)
        for module, (u, _, v) in svd.items():
            a, b = state[lora_a(module)], state[lora_b(module)]
            # the spectrum from the factors against the dense SVD and against the prediction
            got = product_singular_values(a, b).tolist()
            dense = [math.sqrt(x) for x in _dense_sq_singular_values(a, b)[:R]]
            assert got == pytest.approx(dense, rel=1e-9, abs=1e-10)
            assert got == pytest.approx(sorted(sig[module], reverse=True), rel=1e-9, abs=1e-10)
            # the product is sum_j sigma_j u_j v_j^T with the predicted sigma_j: the
            # directions stay, only their weights change
            expected_product = (u * torch.tensor(sig[module], dtype=torch.float64)[None, :]) @ v.T
            np.testing.assert_allclose(
                _dense_product(a, b), expected_product.numpy(), rtol=1e-9, atol=1e-10
            )
        assert energy["share"] == pytest.approx(_expected_shares(sig), rel=1e-9, abs=1e-12)
        assert energy["share"] == pytest.approx(
            _adapter_shares_by_loop(state, list(SHAPES), LEVELS, R), rel=1e-9, abs=1e-12
        )
        if method == "fedilora":  # (6.1.6): the split never moves
            assert energy["share"] == pytest.approx(initial_shares, rel=1e-12, abs=1e-14)


def test_zeropad_shrinks_each_factor_dimension_by_the_covered_share():
    initial, _ = _initial_global()
    factor = [1.0] * R
    for _, clients, state in _identity_rounds("zeropad"):
        c = _covered_share(clients)
        factor = [factor[j] * c[j] for j in range(R)]
        for module in SHAPES:
            for j in range(R):  # (6.1.4): column j of B and row j of A, each by N_j / N
                np.testing.assert_allclose(
                    state[lora_b(module)][:, j].numpy(),
                    factor[j] * initial[lora_b(module)][:, j].numpy(),
                    rtol=1e-12,
                    atol=1e-14,
                )
                np.testing.assert_allclose(
                    state[lora_a(module)][j].numpy(),
                    factor[j] * initial[lora_a(module)][j].numpy(),
                    rtol=1e-12,
                    atol=1e-14,
                )
    # the last round covered no dimension above 4: they are exactly zero from then on, and
    # the energy that is left sits in the bands 1-2 and 3-4
    assert factor[4:] == [0.0] * 4
    energy = rank_energy(state, LEVELS, R)
    assert energy["share"][2] == 0.0 and energy["share"][0] > 0.9


def test_rank_collapse_grows_under_zeropad_and_flexlora_and_stays_under_fedilora():
    collapse = {
        m: [energy_metrics(rank_energy(s, LEVELS, R))["merge/rank_collapse"] for *_, s in rounds]
        for m, rounds in ((m, _identity_rounds(m)) for m in ("fedilora", "zeropad", "flexlora"))
    }
    start = _expected_shares(_expected_singular_values("fedilora", 0))[0]
    assert collapse["fedilora"] == pytest.approx([start] * len(ROUNDS), rel=1e-12)
    for method in ("zeropad", "flexlora"):
        assert all(x <= y + 1e-15 for x, y in zip(collapse[method], collapse[method][1:]))
        assert collapse[method][0] > start
    # squaring the factor shrinks the high bands faster
    assert all(z > f for z, f in zip(collapse["zeropad"], collapse["flexlora"]))
