"""The robust rules' heterogeneous-rank parts against slow references: rank bands, the
per-coordinate statistics over covering clients, product-space distances and outliers."""

from __future__ import annotations

import statistics

import pytest
import torch

from aggregation import FedAvg, get_merger, pad
from aggregation.robust import (
    coordinate_median,
    covered_statistic,
    product_distances,
    product_outliers,
    rank_bands,
    trimmed_mean,
)


def _states(ranks: list[int], seed: int = 0, dtype=torch.float64) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "m.lora_A.weight": torch.randn(r, 4, generator=g, dtype=dtype),
            "m.lora_B.weight": torch.randn(5, r, generator=g, dtype=dtype),
            "n.lora_A.weight": torch.randn(r, 3, generator=g, dtype=dtype),
            "n.lora_B.weight": torch.randn(2, r, generator=g, dtype=dtype),
            "head.bias": torch.randn(2, generator=g, dtype=dtype),
        }
        for r in ranks
    ]


def test_rank_bands_group_dimensions_by_who_covers_them():
    assert rank_bands([4, 1, 2, 4]) == [(0, 1, [0, 1, 2, 3]), (1, 2, [0, 2, 3]), (2, 4, [0, 3])]
    assert rank_bands([3, 3]) == [(0, 3, [0, 1])]
    with pytest.raises(ValueError, match="positive"):
        rank_bands([2, 0])


def _slow_covered(states, ranks, reduce):
    """Per coordinate, loop by loop: the statistic over the clients covering it."""
    out = [{k: v.clone() for k, v in s.items()} for s in states]
    for k in states[0]:
        axis = 0 if "lora_A" in k else 1 if "lora_B" in k else None
        for i, s in enumerate(states):
            for idx in itertools_product(s[k].shape):
                j = idx[axis] if axis is not None else None
                members = [c for c, r in enumerate(ranks) if j is None or r > j]
                out[i][k][idx] = reduce([float(states[c][k][idx]) for c in members])
    return out


def itertools_product(shape):
    import itertools

    return itertools.product(*(range(n) for n in shape))


def _trim(values, beta):
    n = len(values)
    k = int(beta * n)
    kept = sorted(values)[k : n - k]
    return sum(kept) / len(kept)


@pytest.mark.parametrize("ranks", [[4, 2, 1, 4, 2], [3, 3, 3, 3], [1, 4]])
@pytest.mark.parametrize(
    ("rule", "reduce"),
    [
        (coordinate_median, statistics.median),
        (lambda s: trimmed_mean(s, 0.2), lambda v: _trim(v, 0.2)),
        (lambda s: trimmed_mean(s, 0.0), statistics.fmean),
    ],
    ids=["median", "trimmed_0.2", "trimmed_0"],
)
def test_covered_statistic_matches_a_per_coordinate_loop(ranks, rule, reduce):
    states = _states(ranks, seed=len(ranks))
    fast = covered_statistic(states, ranks, rule)
    slow = _slow_covered(states, ranks, reduce)
    for f, s, r in zip(fast, slow, ranks):
        assert f["m.lora_A.weight"].shape[0] == r  # each result stays at its client's rank
        for k in f:
            torch.testing.assert_close(f[k], s[k], rtol=0, atol=1e-12)


def test_median_of_identical_updates_is_that_update_and_trim_0_is_fedavg():
    one = _states([3])[0]
    same = covered_statistic([one, one, one], [3, 3, 3], coordinate_median)
    for s in same:
        for k in one:
            assert torch.equal(s[k], one[k])
    # trimmed mean with nothing trimmed, equal ranks and equal weights, merged: FedAvg itself
    states = _states([3, 3, 3, 3], seed=5)
    replaced = covered_statistic(states, [3] * 4, lambda s: trimmed_mean(s, 0.0))
    merger = get_merger("zeropad")
    via_rule = merger.merge(replaced, [3] * 4, [1] * 4, previous=None, global_rank=3)
    fedavg = merger.merge(states, [3] * 4, [1] * 4, previous=None, global_rank=3)
    for k in fedavg:
        torch.testing.assert_close(via_rule[k], fedavg[k], rtol=0, atol=1e-12)
    assert FedAvg  # the server optimiser that applies it unchanged


def test_a_dimension_wise_merge_of_the_median_returns_the_median_of_the_coverers():
    ranks = [4, 4, 2, 1, 4]
    states = _states(ranks, seed=9)
    replaced = covered_statistic(states, ranks, coordinate_median)
    merged = get_merger("fedilora").merge(replaced, ranks, [7, 1, 3, 2, 9], None, 4)
    a = torch.stack([pad(s, 4)["m.lora_A.weight"] for s in states])  # (n, 4, 4)
    for j in range(4):
        cover = [i for i, r in enumerate(ranks) if r > j]
        expect = a[cover, j].median(dim=0)
        # statistics.median of an even count is the mean of the two middle values
        expect = torch.tensor(
            [statistics.median(a[cover, j, c].tolist()) for c in range(4)], dtype=torch.float64
        )
        torch.testing.assert_close(merged["m.lora_A.weight"][j], expect, rtol=0, atol=1e-12)


def _dense_product_distances(updates, origins):
    """The reference: form every dW_i, Frobenius distances, per-module median normalisation."""
    n = len(updates)
    total = torch.zeros(n, n, dtype=torch.float64)
    modules = sorted({k.split(".lora_")[0] for k in updates[0] if ".lora_" in k})
    blocks = []
    for m in modules:
        a, b = f"{m}.lora_A.weight", f"{m}.lora_B.weight"
        blocks.append([u[b] @ u[a] - o[b] @ o[a] for u, o in zip(updates, origins)])
    for k in updates[0]:
        if ".lora_" not in k:
            blocks.append([u[k] - o[k] for u, o in zip(updates, origins)])
    for dws in blocks:
        d = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            for j in range(n):
                d[i, j] = float(((dws[i] - dws[j]) ** 2).sum())
        scale = statistics.median_low(
            [float(d[i, j]) for i in range(n) for j in range(n) if i != j]
        )
        total += d / scale if scale > 0 else d
    return total


def test_product_distances_match_the_dense_products():
    ranks = [4, 1, 2, 4]
    updates, origins = _states(ranks, seed=1), _states(ranks, seed=2)
    fast, names = product_distances(updates, origins)
    slow = _dense_product_distances(updates, origins)
    assert names == ["m.", "n.", "head.bias"]
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-9)


def _at_rank(state: dict, r: int) -> dict:
    return {
        k: v[:r] if "lora_A" in k else v[:, :r] if "lora_B" in k else v for k, v in state.items()
    }


def test_product_distances_ignore_rank_padding_and_equal_functions():
    """A rank-2 client and a rank-4 one that pads the same factors are at distance 0."""
    (state,) = _states([4], seed=3)
    zero = {k: torch.zeros_like(v) for k, v in state.items()}
    small, small_origin = _at_rank(state, 2), _at_rank(zero, 2)
    dist, _ = product_distances([pad(small, 4), small], [zero, small_origin])
    assert float(dist[0, 1]) == pytest.approx(0.0, abs=1e-12)
    # while in the zero-padded factor space a rank difference alone separates clients
    other = {k: v.clone() for k, v in state.items()}
    dist, _ = product_distances([state, other, small], [zero, zero, small_origin])
    assert float(dist[0, 1]) == 0.0 and float(dist[0, 2]) > 0


def test_product_outliers_reject_the_far_client_but_never_a_majority():
    d = torch.tensor(
        [[0, 1, 1.2, 50], [1, 0, 0.9, 55], [1.2, 0.9, 0, 52], [50, 55, 52, 0]],
        dtype=torch.float64,
    )
    scores, rejected = product_outliers(d, 3.0)
    # median distance to the others (the lower middle of three): 1.2, 1, 1.2, 52
    assert scores == pytest.approx([1.2, 1.0, 1.2, 52.0])
    assert rejected == [3]
    # two far clients of five are both left out; three of five never are
    far = torch.full((5, 5), 100.0, dtype=torch.float64).fill_diagonal_(0)
    far[:3, :3] = torch.tensor([[0, 1, 1], [1, 0, 1], [1, 1, 0]])
    assert product_outliers(far, 3.0)[1] == [3, 4]
    assert product_outliers(torch.zeros(2, 2, dtype=torch.float64), 3.0)[1] == []
    with pytest.raises(ValueError, match="above 1"):
        product_outliers(d, 1.0)
