"""Merge diagnostics (aggregation/diagnostics.py) against explicit loops over clients,
modules and dimensions, and against the merges themselves."""

from __future__ import annotations

import math

import pytest
import torch
from lora_builders import MODULES, NUM_SAMPLES, RANKS, client_states, lora_a, lora_b

from aggregation import fedilora_merge, zeropad_merge
from aggregation.diagnostics import merge_diagnostics, top_bands

R = max(RANKS)


def _row(state, module: str, j: int) -> torch.Tensor:
    """Dimension ``j`` of one module: row j of A and column j of B, flattened, float64."""
    a = state[lora_a(module)].to(torch.float64)
    b = state[lora_b(module)].to(torch.float64)
    return torch.cat([a[j].reshape(-1), b[:, j].reshape(-1)])


def _slow(states, ranks, n, weighting):
    """Every client's contribution tensor, dimension by dimension, module by module."""
    total = sum(n)
    out = []
    for i, state in enumerate(states):
        parts = {}
        for j in range(R):
            covering = [c for c in range(len(states)) if ranks[c] > j]
            if ranks[i] <= j:
                continue
            w = n[i] / (sum(n[c] for c in covering) if weighting == "fedilora" else total)
            for module in MODULES:
                parts[(module, j)] = w * _row(state, module, j)
        out.append(parts)
    return out


@pytest.mark.parametrize("weighting", ["fedilora", "zeropad"])
@pytest.mark.parametrize("ranks", [RANKS, [2, 4, 8, 8, 1], [4, 4, 4, 4, 4]])
def test_diagnostics_equal_explicit_loops(weighting, ranks):
    states = client_states(ranks)
    d = merge_diagnostics(states, ranks, NUM_SAMPLES, R, weighting)
    parts = _slow(states, ranks, NUM_SAMPLES, weighting)
    for j in range(R):
        covering = [i for i in range(len(ranks)) if ranks[i] > j]
        assert d.coverage[j] == len(covering)
        assert d.weight[j] == pytest.approx(sum(NUM_SAMPLES[i] for i in covering))
    norms = []
    for i, p in enumerate(parts):
        lower = max([r for r in ranks if r < ranks[i]], default=0)
        assert d.top_band[i].tolist() == [lower, ranks[i]]
        full = math.sqrt(sum(float(v.square().sum()) for v in p.values()))
        top = math.sqrt(
            sum(float(v.square().sum()) for (m, j), v in p.items() if lower <= j < ranks[i])
        )
        assert float(d.contribution[i]) == pytest.approx(full, rel=1e-12)
        assert float(d.contribution_top[i]) == pytest.approx(top, rel=1e-12, abs=1e-15)
        norms.append(full**2)
    assert d.share.tolist() == pytest.approx([x / sum(norms) for x in norms], rel=1e-12)
    assert float(d.share.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "weighting, merge", [("fedilora", fedilora_merge), ("zeropad", zeropad_merge)]
)
def test_contributions_sum_to_the_merge_and_update_norms_match_it(weighting, merge):
    """The contributions are what the merge adds up: their sum is the merged factors; the
    update norm per dimension is the merged minus the previous adapter's, dimension by
    dimension."""
    states = client_states(RANKS, dtype=torch.float64)
    merged = merge(states, RANKS, NUM_SAMPLES, global_rank=R)
    parts = _slow(states, RANKS, NUM_SAMPLES, weighting)
    for module in MODULES:
        for j in range(R):
            summed = sum(p[(module, j)] for p in parts if (module, j) in p)
            assert torch.allclose(summed, _row(merged, module, j), rtol=1e-12, atol=1e-14)
    previous = client_states([R], dtype=torch.float64)[0]
    d = merge_diagnostics(states, RANKS, NUM_SAMPLES, R, weighting, merged, previous)
    for j in range(R):
        want = math.sqrt(
            sum(float((_row(merged, m, j) - _row(previous, m, j)).square().sum()) for m in MODULES)
        )
        assert float(d.update_norm[j]) == pytest.approx(want, rel=1e-12)


def test_one_high_rank_client_owns_its_top_band_under_fedilora_not_zeropad():
    """The mechanism issue 16 asks about: a lone rank-8 client among rank-2 ones gets full
    weight on dimensions 2..7 under dimension-wise reweighting, its share under zero-padding."""
    ranks, n = [8, 2, 2, 2], [10, 30, 30, 30]
    states = client_states(ranks, dtype=torch.float64)
    fed = merge_diagnostics(states, ranks, n, 8, "fedilora")
    zp = merge_diagnostics(states, ranks, n, 8, "zeropad")
    assert top_bands(ranks).tolist() == [[2, 8], [0, 2], [0, 2], [0, 2]]
    assert fed.coverage.tolist() == [4, 4, 1, 1, 1, 1, 1, 1]
    # on its own band the lone client's contribution is 10x larger (weight 1 against 0.1)
    assert float(fed.contribution_top[0]) == pytest.approx(10 * float(zp.contribution_top[0]))
    assert float(fed.share[0]) > float(zp.share[0])


def test_an_unknown_weighting_is_refused():
    with pytest.raises(ValueError, match="weighting"):
        merge_diagnostics(client_states([2]), [2], [1], 2, "hetlora")
