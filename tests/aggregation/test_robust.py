"""Robust rules (docs/algorithms.md §4b) against slow, element-by-element references."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest
import torch

from aggregation.robust import (
    clip_to_norm,
    coordinate_median,
    krum_scores,
    multi_krum,
    trimmed_mean,
    update_norms,
)


def _updates(n: int, seed: int = 0, dtype=torch.float64) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "m.lora_A.weight": torch.randn(3, 4, generator=g, dtype=dtype),
            "m.lora_B.weight": torch.randn(5, 3, generator=g, dtype=dtype),
            "head.bias": torch.randn(2, generator=g, dtype=dtype),
        }
        for _ in range(n)
    ]


def _values(u: dict) -> list[float]:
    """The flat vector of an update, slowly: sorted keys, row-major."""
    return [float(x) for k in sorted(u) for x in u[k].reshape(-1).tolist()]


def _per_coordinate(updates: list[dict], reduce) -> list[float]:
    columns = zip(*(_values(u) for u in updates))
    return [reduce(list(c)) for c in columns]


@pytest.mark.parametrize("n", [1, 2, 5, 6])
def test_median_is_the_median_of_every_coordinate(n):
    updates = _updates(n)
    got = _values(coordinate_median(updates))
    assert got == pytest.approx(_per_coordinate(updates, statistics.median), abs=1e-12)


@pytest.mark.parametrize(("n", "beta"), [(5, 0.0), (5, 0.2), (6, 0.34), (7, 0.49)])
def test_trimmed_mean_drops_the_extremes_of_every_coordinate(n, beta):
    updates = _updates(n, seed=1)
    k = math.floor(beta * n)

    def reference(column):
        kept = sorted(column)[k : n - k]
        return sum(kept) / len(kept)

    got = _values(trimmed_mean(updates, beta))
    assert got == pytest.approx(_per_coordinate(updates, reference), abs=1e-12)


def test_trimming_nothing_is_the_plain_mean_and_identical_updates_are_kept():
    updates = _updates(4, seed=2)
    mean = _per_coordinate(updates, lambda c: sum(c) / len(c))
    assert _values(trimmed_mean(updates, 0.0)) == pytest.approx(mean, abs=1e-12)
    same = [updates[0]] * 5
    median = coordinate_median(same)  # the middle value itself: exact
    assert all(torch.equal(median[k], updates[0][k]) for k in updates[0])
    for merged in (trimmed_mean(same, 0.2), multi_krum(same, 1, 3)[0]):  # means: to rounding
        for k in updates[0]:
            torch.testing.assert_close(merged[k], updates[0][k], rtol=1e-15, atol=1e-15)


def test_clipping_bounds_every_norm_and_leaves_short_updates_alone():
    updates = _updates(4, seed=3)
    norms = [math.sqrt(sum(x * x for x in _values(u))) for u in updates]
    assert update_norms(updates) == pytest.approx(norms, rel=1e-12)
    bound = sorted(norms)[1] + 1e-9  # two updates are at most this long
    clipped, scales = clip_to_norm(updates, bound)
    for u, c, s, norm in zip(updates, clipped, scales, norms):
        assert math.sqrt(sum(x * x for x in _values(c))) <= bound * (1 + 1e-12)
        if norm <= bound:
            assert s == 1.0 and all(torch.equal(c[k], u[k]) for k in u)
        else:
            assert s == pytest.approx(bound / norm)
            assert _values(c) == pytest.approx([x * bound / norm for x in _values(u)])


def test_krum_scores_sum_the_nearest_squared_distances():
    updates = _updates(6, seed=4)
    f = 1
    vectors = [_values(u) for u in updates]
    expected = []
    for i, v in enumerate(vectors):
        dists = sorted(
            sum((a - b) ** 2 for a, b in zip(v, w)) for j, w in enumerate(vectors) if j != i
        )
        expected.append(sum(dists[: len(vectors) - f - 2]))
    assert krum_scores(updates, f) == pytest.approx(expected, rel=1e-10)


def test_krum_picks_the_honest_cluster_and_multi_krum_averages_it():
    g = torch.Generator().manual_seed(5)
    centre = {"w": torch.randn(8, generator=g, dtype=torch.float64)}
    honest = [
        {"w": centre["w"] + 0.01 * torch.randn(8, generator=g, dtype=torch.float64)}
        for _ in range(5)
    ]
    attacker = {"w": centre["w"] * -100}
    updates = honest[:2] + [attacker] + honest[2:]
    merged, selected = multi_krum(updates, num_faulty=1, num_selected=4)
    assert 2 not in selected and len(selected) == 4
    want = [sum(c) / 4 for c in zip(*(_values(updates[i]) for i in selected))]
    assert _values(merged) == pytest.approx(want, abs=1e-12)
    single, chosen = multi_krum(updates, num_faulty=1)
    assert chosen[0] != 2 and all(torch.equal(single[k], updates[chosen[0]][k]) for k in single)


def test_each_rule_resists_one_huge_update_that_the_mean_does_not():
    updates = _updates(7, seed=6)
    bad = {k: v * 1e6 for k, v in updates[3].items()}
    attacked = updates[:3] + [bad] + updates[4:]
    honest_median = _values(coordinate_median(updates))
    scale = max(abs(x) for x in honest_median) + 10
    for merged in (
        coordinate_median(attacked),
        trimmed_mean(attacked, 0.15),
        multi_krum(attacked, 1, 5)[0],
    ):
        assert max(abs(x) for x in _values(merged)) < scale
    mean = _per_coordinate(attacked, lambda c: sum(c) / len(c))
    assert max(abs(x) for x in mean) > 1e4


def test_dtypes_are_kept_and_inputs_untouched():
    updates = _updates(5, seed=7, dtype=torch.float32)
    before = [{k: v.clone() for k, v in u.items()} for u in updates]
    outs = [
        coordinate_median(updates),
        trimmed_mean(updates, 0.2),
        multi_krum(updates, 1, 2)[0],
        clip_to_norm(updates, 0.5)[0][0],
    ]
    for out in outs:
        assert {k: v.dtype for k, v in out.items()} == dict.fromkeys(updates[0], torch.float32)
    for u, b in zip(updates, before):
        assert all(torch.equal(u[k], b[k]) for k in u)


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda u: trimmed_mean(u, 0.5), "beta"),
        (lambda u: krum_scores(u[:3], 1), "n > f + 2"),
        (lambda u: multi_krum(u, 1, 0), "num_selected"),
        (lambda u: clip_to_norm(u, 0.0), "max_norm"),
        (lambda u: clip_to_norm(u, float("inf")), "max_norm"),
        (lambda u: coordinate_median([]), "at least one"),
        (lambda u: coordinate_median([u[0], {"x": torch.zeros(1)}]), "keys differ"),
        (
            lambda u: coordinate_median(
                [u[0], {**u[1], "head.bias": torch.zeros(3, dtype=torch.float64)}]
            ),
            "shape",
        ),
    ],
)
def test_bad_arguments_name_the_problem(call, words):
    with pytest.raises(ValueError, match=words.replace("+", r"\+")):
        call(_updates(5, seed=8))


def test_ties_in_krum_break_by_client_order():
    same = [{"w": torch.ones(3, dtype=torch.float64)} for _ in range(5)]
    assert multi_krum(same, 1, 2)[1] == [0, 1]
    # every permutation of distinct updates selects the same updates
    updates = _updates(5, seed=9)
    _, base = multi_krum(updates, 1, 2)
    chosen = {id(updates[i]) for i in base}
    for perm in itertools.islice(itertools.permutations(range(5)), 12):
        shuffled = [updates[i] for i in perm]
        _, sel = multi_krum(shuffled, 1, 2)
        assert {id(shuffled[i]) for i in sel} == chosen
