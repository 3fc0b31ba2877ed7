"""Merge diagnostics (aggregation/diagnostics.py, docs/algorithms.md §1.9) against explicit loops
over clients, modules and dimensions, and against the merges themselves."""

from __future__ import annotations

import math

import pytest
import torch
from lora_builders import MODULES, NUM_SAMPLES, RANKS, build_state, client_states, lora_a, lora_b

from aggregation import get_merger
from aggregation.diagnostics import (
    band_metrics,
    diagnose,
    dimension_sq_norms,
    merge_diagnostics,
    top_bands,
)
from aggregation.hetlora import product_norm

R = max(RANKS)
PREVIOUS = build_state(R, seed=99, dtype=torch.float64)


def _row(state, module: str, j: int) -> torch.Tensor:
    """Dimension ``j`` of one module: row j of A and column j of B, flattened, float64 (zero
    past the state's rank)."""
    a = state[lora_a(module)].to(torch.float64)
    b = state[lora_b(module)].to(torch.float64)
    if j >= a.shape[0]:
        return torch.zeros(a[0].numel() + b[:, 0].numel(), dtype=torch.float64)
    return torch.cat([a[j].reshape(-1), b[:, j].reshape(-1)])


def _slow_weights(method, states, ranks, n):
    """``w_ij`` written out from docs/algorithms.md §1.1, §1.2, §1.4 and §1.10, one entry at a
    time."""
    total = sum(n)
    norms = [n[i] * product_norm(states[i]) for i in range(len(states))]
    w = [[0.0] * R for _ in states]
    for j in range(R):
        covering = [c for c in range(len(states)) if ranks[c] > j]
        covered = sum(n[c] for c in covering)
        for i in covering:
            if method == "fedilora":
                w[i][j] = n[i] / covered
            elif method == "zeropad":
                w[i][j] = n[i] / total
            elif method == "hetlora":
                w[i][j] = norms[i] / sum(norms)
            elif method == "fedilora_damped":  # damping 1: lambda_j = W_j / W
                w[i][j] = (covered / total) * n[i] / covered
    return w


def _slow_contributions(method, states, ranks, n, previous):
    """Every client's contribution ``w_ij (x_ij - prev_j)``, dimension by dimension, module by
    module."""
    w = _slow_weights(method, states, ranks, n)
    out = []
    for i, state in enumerate(states):
        parts = {}
        for j in range(ranks[i]):
            for module in MODULES:
                prev = _row(previous, module, j) if previous is not None else 0
                parts[(module, j)] = w[i][j] * (_row(state, module, j) - prev)
        out.append(parts)
    return out


@pytest.mark.parametrize("method", ["fedilora", "zeropad", "hetlora", "fedilora_damped"])
@pytest.mark.parametrize("ranks", [RANKS, [2, 4, 8, 8, 1], [4, 4, 4, 4, 4]])
@pytest.mark.parametrize("previous", [PREVIOUS, None], ids=["from-previous", "from-zero"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_diagnostics_equal_explicit_loops(method, ranks, previous, dtype):
    """float64 updates are reduced in float64, float32 ones in float32 (no float64 copy of an
    update): float32 rounding bounds the relative error there."""
    rel = 1e-9 if dtype == torch.float64 else 1e-5
    states = client_states(ranks, dtype=dtype)
    d = diagnose(get_merger(method), states, ranks, NUM_SAMPLES, R, previous)
    parts = _slow_contributions(method, states, ranks, NUM_SAMPLES, previous)
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
        assert float(d.contribution[i]) == pytest.approx(full, rel=rel)
        assert float(d.contribution_top[i]) == pytest.approx(top, rel=rel, abs=1e-15)
        norms.append(full**2)
    assert d.share.tolist() == pytest.approx([x / sum(norms) for x in norms], rel=2 * rel)
    assert float(d.share.sum()) == pytest.approx(1.0)
    w = _slow_weights(method, states, ranks, NUM_SAMPLES)
    assert d.merge_weight.tolist() == pytest.approx([sum(c[j] for c in w) for j in range(R)])


@pytest.mark.parametrize("method", ["fedilora", "zeropad", "hetlora", "fedilora_damped"])
def test_contributions_add_up_to_the_merged_update(method):
    """What the merge adds to the previous global on dimension j is the clients'
    contributions plus ``-(1 - sum_i w_ij) prev_j`` (zero-padding's shrinkage; 0 for the
    dimension-wise average, and for the damped merge whose rest stays at prev); the update
    norm per dimension is the merged minus the previous adapter's."""
    states = client_states(RANKS, dtype=torch.float64)
    merger = get_merger(method)
    merged = merger.merge(states, RANKS, NUM_SAMPLES, previous=PREVIOUS, global_rank=R)
    parts = _slow_contributions(method, states, RANKS, NUM_SAMPLES, PREVIOUS)
    w = _slow_weights(method, states, RANKS, NUM_SAMPLES)
    keeps_rest = method in ("fedilora", "fedilora_damped")
    for module in MODULES:
        for j in range(R):
            summed = sum(p[(module, j)] for p in parts if (module, j) in p)
            rest = 0.0 if keeps_rest else (1 - sum(c[j] for c in w)) * _row(PREVIOUS, module, j)
            change = _row(merged, module, j) - _row(PREVIOUS, module, j)
            assert torch.allclose(summed - rest, change, rtol=1e-10, atol=1e-12)
    d = diagnose(merger, states, RANKS, NUM_SAMPLES, R, PREVIOUS, new=merged)
    for j in range(R):
        want = math.sqrt(
            sum(float((_row(merged, m, j) - _row(PREVIOUS, m, j)).square().sum()) for m in MODULES)
        )
        assert float(d.update_norm[j]) == pytest.approx(want, rel=1e-12)


def test_half_precision_updates_are_reduced_in_float32():
    low = build_state(4, seed=5, dtype=torch.float64)
    half = {k: v.to(torch.bfloat16) for k, v in low.items()}
    want = dimension_sq_norms({k: v.double() for k, v in half.items()}, 4, PREVIOUS)
    assert torch.allclose(dimension_sq_norms(half, 4, PREVIOUS), want, rtol=1e-5)


def test_dimension_sq_norms_pad_and_truncate_the_previous_adapter():
    low = build_state(2, seed=5, dtype=torch.float64)
    got = dimension_sq_norms(low, 4, PREVIOUS)
    for j in range(4):
        want = 0.0
        if j < 2:
            want = sum(
                float((_row(low, m, j) - _row(PREVIOUS, m, j)).square().sum()) for m in MODULES
            )
        assert float(got[j]) == pytest.approx(want, rel=1e-12)
    # a previous adapter of lower rank counts as zero past its rank
    assert dimension_sq_norms(PREVIOUS, R, low)[5] == pytest.approx(
        sum(float(_row(PREVIOUS, m, 5).square().sum()) for m in MODULES)
    )


def test_one_high_rank_client_owns_its_top_band_under_fedilora_not_zeropad():
    """The mechanism issue 16 asks about: a lone rank-8 client among rank-2 ones gets full
    weight on dimensions 2..7 under dimension-wise reweighting, its share under zero-padding
    and under the damped merge."""
    ranks, n = [8, 2, 2, 2], [10, 30, 30, 30]
    states = client_states(ranks, dtype=torch.float64)
    fed, zp, damped = (
        diagnose(get_merger(m), states, ranks, n, 8, PREVIOUS)
        for m in ("fedilora", "zeropad", "fedilora_damped")
    )
    assert top_bands(ranks).tolist() == [[2, 8], [0, 2], [0, 2], [0, 2]]
    assert fed.coverage.tolist() == [4, 4, 1, 1, 1, 1, 1, 1]
    # on its own band the lone client's contribution is 10x larger (weight 1 against 0.1)
    assert float(fed.contribution_top[0]) == pytest.approx(10 * float(zp.contribution_top[0]))
    assert float(damped.contribution_top[0]) == pytest.approx(float(zp.contribution_top[0]))
    assert float(fed.share[0]) > float(zp.share[0])
    assert fed.merge_weight[2:].tolist() == pytest.approx([1.0] * 6)
    assert zp.merge_weight[2:].tolist() == pytest.approx([0.1] * 6)


def test_product_space_merges_report_sample_weights():
    """FlexLoRA and FLoRA average ``B_i A_i`` with ``p_i``: their factor-space view."""
    states = client_states(RANKS, dtype=torch.float64)
    for method in ("flexlora", "flora"):
        d = diagnose(get_merger(method), states, RANKS, NUM_SAMPLES, R, PREVIOUS)
        z = diagnose(get_merger("zeropad"), states, RANKS, NUM_SAMPLES, R, PREVIOUS)
        assert torch.equal(d.contribution, z.contribution)


def test_client_columns_and_dimensions_are_plain_values():
    states = client_states(RANKS, dtype=torch.float64)
    d = diagnose(get_merger("fedilora"), states, RANKS, NUM_SAMPLES, R, PREVIOUS, new=PREVIOUS)
    cols = d.client_columns([10, 11, 12, 13, 14])
    assert cols[10]["top_band"] == "4-8" and cols[13]["top_band"] == "0-2"
    assert sum(c["share"] for c in cols.values()) == pytest.approx(1.0)
    dims = d.dimensions()
    assert dims["coverage"] == [5, 5, 3, 3, 2, 2, 2, 2]
    assert dims["update_norm"] == [0.0] * R  # new == previous


def test_band_metrics_follow_the_rank_levels():
    dims = {
        "coverage": [5, 5, 3, 3, 2, 2, 2, 2],
        "weight": [100, 100, 60, 60, 40, 40, 40, 40],
        "merge_weight": [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5],
        "update_norm": [3, 4, 0, 0, 1, 1, 1, 1],
    }
    m = band_metrics(dims, [2, 4, 8, 8])
    assert set(m) == {
        f"merge/band_{b}/{k}"
        for b in ("00-02", "02-04", "04-08")
        for k in ("coverage", "weight", "merge_weight", "update_norm")
    }
    assert m["merge/band_00-02/update_norm"] == pytest.approx(5.0)
    assert m["merge/band_04-08/update_norm"] == pytest.approx(2.0)
    assert m["merge/band_02-04/coverage"] == 3 and m["merge/band_04-08/weight"] == 40
    assert m["merge/band_04-08/merge_weight"] == pytest.approx(0.5)
    # a level past the adapter's width is cut off; no update norm, no such metric
    short = {k: v[:4] for k, v in dims.items() if k != "update_norm"}
    assert set(band_metrics(short, [2, 4, 8])) == {
        f"merge/band_{b}/{k}"
        for b in ("00-02", "02-04")
        for k in ("coverage", "weight", "merge_weight")
    }


def test_inconsistent_inputs_are_refused():
    with pytest.raises(ValueError, match="disagree"):
        merge_diagnostics(torch.zeros(2, 4), [2, 4], [1, 1], torch.zeros(3, 4))


# -- clients holding other dimensions than their leading ones (Fed-PLoRA, §6.3) -----------------
HELD = [[1, 5], [0, 2, 5, 7], [5], [1, 2, 3, 5, 6, 7], [0, 7]]  # nobody holds dimension 4
HELD_SAMPLES = [10, 30, 20, 5, 35]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_diagnostics_follow_the_dimensions_each_client_holds(dtype):
    """Fed-PLoRA's random modules: coverage of dimension j counts the clients whose K_i holds
    j, the weights are (6.3.3)'s, each client's change is measured at its own modules, and the
    top band (a band of leading dimensions) is left out; all against loops over the index
    sets, and the contributions add up to what Fed-PLoRA's merge did."""
    from aggregation.fedplora import fedplora_merge

    rel = 1e-9 if dtype == torch.float64 else 1e-5
    ranks = [len(k) for k in HELD]
    states = client_states(ranks, dtype=dtype)
    merged = fedplora_merge(
        [{k: v.double() for k, v in s.items()} for s in states], HELD, HELD_SAMPLES, PREVIOUS
    )
    d = diagnose(
        get_merger("fedilora"), states, ranks, HELD_SAMPLES, R, PREVIOUS, new=merged, dims=HELD
    )
    w = [[0.0] * R for _ in HELD]
    for j in range(R):
        holders = [i for i, k in enumerate(HELD) if j in k]
        total = sum(HELD_SAMPLES[i] for i in holders)
        assert d.coverage[j] == len(holders)
        assert d.weight[j] == sum(HELD_SAMPLES[i] for i in holders)
        for i in holders:
            w[i][j] = HELD_SAMPLES[i] / total
        assert float(d.merge_weight[j]) == pytest.approx(sum(c[j] for c in w), abs=1e-15)
        want = math.sqrt(
            sum(float((_row(merged, m, j) - _row(PREVIOUS, m, j)).square().sum()) for m in MODULES)
        )
        assert float(d.update_norm[j]) == pytest.approx(want, rel=1e-12)
    assert d.coverage[4] == 0 and d.merge_weight[4] == 0 and d.update_norm[4] == 0
    parts = []  # client i's contribution on module m, dimension j = K_i[p]
    for i, (state, held) in enumerate(zip(states, HELD)):
        parts.append(
            {
                (m, j): w[i][j] * (_row(state, m, p) - _row(PREVIOUS, m, j))
                for p, j in enumerate(held)
                for m in MODULES
            }
        )
    norms = [sum(float(v.square().sum()) for v in p.values()) for p in parts]
    assert d.contribution.tolist() == pytest.approx([math.sqrt(x) for x in norms], rel=rel)
    assert d.share.tolist() == pytest.approx([x / sum(norms) for x in norms], rel=2 * rel)
    assert d.contribution_top is None and d.top_band is None
    columns = d.client_columns(range(len(HELD)))
    assert all(set(c) == {"contribution", "share"} for c in columns.values())
    if dtype == torch.float64:  # (1.9.5) with mu_j = 1: the contributions are the update
        for m in MODULES:
            for j in range(R):
                summed = sum((p[(m, j)] for p in parts if (m, j) in p), torch.tensor(0.0).double())
                change = _row(merged, m, j) - _row(PREVIOUS, m, j)
                assert torch.allclose(summed, change, rtol=1e-10, atol=1e-12)


def test_leading_index_sets_give_the_leading_numbers_without_a_top_band():
    states = client_states(RANKS, dtype=torch.float64)
    merger = get_merger("fedilora")
    leading = diagnose(merger, states, RANKS, NUM_SAMPLES, R, PREVIOUS, new=PREVIOUS)
    held = diagnose(
        merger,
        states,
        RANKS,
        NUM_SAMPLES,
        R,
        PREVIOUS,
        new=PREVIOUS,
        dims=[list(range(r)) for r in RANKS],
    )
    for name in ("coverage", "weight", "merge_weight", "contribution", "share", "update_norm"):
        assert torch.equal(getattr(held, name), getattr(leading, name)), name
    assert held.top_band is None and leading.top_band is not None


def test_dimension_weights_on_held_dimensions():
    """Zero-padding's ``p_i`` and FediLoRA's ``n_i / W_j`` on the dimensions each client holds;
    the merges defined on leading dimensions only refuse a mask."""
    from aggregation.diagnostics import dimension_mask

    ranks = [len(k) for k in HELD]
    mask = dimension_mask(ranks, HELD, R)
    for i, k in enumerate(HELD):
        assert [j for j in range(R) if mask[i, j]] == k
    n = HELD_SAMPLES
    zp = get_merger("zeropad").dimension_weights(ranks, n, n, R, covers=mask)
    fed = get_merger("fedilora").dimension_weights(ranks, n, n, R, covers=mask)
    for i, k in enumerate(HELD):
        for j in range(R):
            held_by = [c for c, kc in enumerate(HELD) if j in kc]
            assert float(zp[i, j]) == pytest.approx(n[i] / sum(n) if j in k else 0.0)
            want = n[i] / sum(n[c] for c in held_by) if j in k else 0.0
            assert float(fed[i, j]) == pytest.approx(want)
    for method in ("fedilora_damped", "raflora"):
        with pytest.raises(ValueError, match="leading dimensions"):
            get_merger(method).dimension_weights(ranks, n, n, R, covers=mask)


def test_dimension_sq_norms_at_held_dimensions():
    low = build_state(2, seed=5, dtype=torch.float64)
    got = dimension_sq_norms(low, R, PREVIOUS, dims=[6, 3])
    for j in range(R):
        want = 0.0
        if j in (6, 3):
            p = [6, 3].index(j)
            want = sum(
                float((_row(low, m, p) - _row(PREVIOUS, m, j)).square().sum()) for m in MODULES
            )
        assert float(got[j]) == pytest.approx(want, rel=1e-12)
    for bad in ([3, 3], [1, R], [1]):
        with pytest.raises(ValueError):
            dimension_sq_norms(low, R, PREVIOUS, dims=bad)
    with pytest.raises(ValueError, match="disagree"):
        merge_diagnostics(
            torch.zeros(1, 4), [2], [1], torch.zeros(1, 4), covers=torch.ones(1, 4, dtype=bool)
        )


def test_band_metrics_average_bands_whose_coverage_varies():
    """Under held dimensions coverage and weight vary inside a rank band: their means; with
    leading dimensions (here pruned ranks, below the levels) the band's first dimension's."""
    dims = {
        "coverage": [2, 1, 3, 0],
        "weight": [40, 30, 60, 0],
        "merge_weight": [1, 1, 1, 0],
        "leading": False,
    }
    m = band_metrics(dims, [2, 4])
    assert m["merge/band_00-02/coverage"] == 1.5 and m["merge/band_02-04/coverage"] == 1.5
    assert m["merge/band_00-02/weight"] == 35 and m["merge/band_02-04/weight"] == 30
    assert m["merge/band_02-04/merge_weight"] == 0.5
    pruned = {"coverage": [3, 2, 1, 1], "weight": [60, 40, 5, 5], "merge_weight": [1] * 4}
    m = band_metrics(pruned, [2, 4])
    assert m["merge/band_00-02/coverage"] == 3 and m["merge/band_02-04/weight"] == 5
    held = diagnose(
        get_merger("fedilora"),
        client_states([len(k) for k in HELD], dtype=torch.float64),
        [len(k) for k in HELD],
        HELD_SAMPLES,
        R,
        PREVIOUS,
        dims=HELD,
    )
    assert held.dimensions()["leading"] is False
    assert (
        "leading"
        not in diagnose(
            get_merger("fedilora"), client_states(RANKS), RANKS, NUM_SAMPLES, R, PREVIOUS
        ).dimensions()
    )
