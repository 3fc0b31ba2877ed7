"""Fed-PLoRA's module draw, fold and per-module average (docs/algorithms.md §6.3) against slow
float64 references written module by module."""

from __future__ import annotations

import random

import pytest
import torch
from lora_builders import (
    DENSE,
    MODULES,
    NUM_SAMPLES,
    RANKS,
    assert_states_close,
    assert_states_equal,
    build_state,
    lora_a,
    lora_b,
)

from aggregation import fedilora_merge
from aggregation.fedplora import (
    complement,
    fedplora_merge,
    folded_delta,
    module_indices,
    module_weights,
    select_modules,
)

R = 8


def _column(state, module, j) -> torch.Tensor:
    """Module ``j``'s ``b_j`` as a float64 vector (a 1x1 conv's too)."""
    b = state[lora_b(module)].to(torch.float64)
    return b.reshape(b.shape[0], b.shape[1])[:, j]


def _row(state, module, j) -> torch.Tensor:
    a = state[lora_a(module)].to(torch.float64)
    return a.reshape(a.shape[0], -1)[j]


def test_random_draw_is_seeded_sized_and_independent_of_the_order_asked():
    tasks = [(round_idx, cid, r) for round_idx in (1, 2, 3) for cid, r in enumerate(RANKS)]
    first = {(t, c): module_indices("random", r, R, 7, t, c) for t, c, r in tasks}
    shuffled = list(tasks)
    random.Random(0).shuffle(shuffled)
    again = {(t, c): module_indices("random", r, R, 7, t, c) for t, c, r in shuffled}
    assert again == first
    for (_, c), chosen in first.items():
        assert chosen == sorted(set(chosen)) and len(chosen) == RANKS[c]
        assert all(0 <= j < R for j in chosen)
    # another seed, round or client draws another set (for the rank-2 clients, with 28 sets)
    assert (
        module_indices("random", 2, R, 8, 1, 3) != first[(1, 3)]
        or module_indices("random", 2, R, 8, 1, 4) != first[(1, 4)]
    )
    assert first[(1, 3)] != first[(2, 3)] or first[(1, 4)] != first[(2, 4)]


def test_random_draw_reaches_every_module_about_equally():
    counts = torch.zeros(R)
    for t in range(1, 401):
        counts[module_indices("random", 2, R, 3, t, 0)] += 1
    # 800 draws over 8 modules: 100 each expected, a binomial std of about 9.4
    assert counts.min() > 60 and counts.max() < 140


def test_first_rule_is_the_leading_modules_and_bad_arguments_raise():
    assert module_indices("first", 3, R, 7, 5, 2) == [0, 1, 2]
    assert module_indices("random", R, R, 7, 5, 2) == list(range(R))
    with pytest.raises(ValueError, match="rule"):
        module_indices("last", 2, R, 0, 1, 0)
    with pytest.raises(ValueError, match="rank"):
        module_indices("random", R + 1, R, 0, 1, 0)


def test_select_modules_takes_rows_of_a_and_columns_of_b():
    state = build_state(R, seed=1, dtype=torch.float64)
    chosen = [6, 1, 3]
    picked = select_modules(state, chosen)
    for module in MODULES:
        for p, j in enumerate(chosen):
            assert torch.equal(_row(picked, module, p), _row(state, module, j))
            assert torch.equal(_column(picked, module, p), _column(state, module, j))
    for key in DENSE:
        assert torch.equal(picked[key], state[key])


def test_fold_plus_trained_modules_is_the_global_product():
    """``W_0 + sum_{j not in K} b_j a_j + sum_{j in K} b_j a_j = W_0 + B_g A_g`` per module,
    the fold checked against a slow sum of outer products."""
    state = build_state(R, seed=2, dtype=torch.float64)
    chosen = [0, 2, 5]
    fold = folded_delta(state, chosen)
    start = select_modules(state, chosen)
    for module, (d, k, is_conv) in MODULES.items():
        slow = [[0.0] * k for _ in range(d)]
        for j in range(R):
            if j not in chosen:
                b_j, a_j = _column(state, module, j).tolist(), _row(state, module, j).tolist()
                for x in range(d):
                    for y in range(k):
                        slow[x][y] += b_j[x] * a_j[y]
        slow = torch.tensor(slow, dtype=torch.float64)
        got = fold[f"{module}."].reshape(d, k)
        assert fold[f"{module}."].shape == ((d, k, 1, 1) if is_conv else (d, k))
        torch.testing.assert_close(got, slow, rtol=0, atol=1e-12)
        trained = sum(
            torch.outer(_column(start, module, p), _row(start, module, p)) for p in [0, 1, 2]
        )
        full = sum(torch.outer(_column(state, module, j), _row(state, module, j)) for j in range(R))
        torch.testing.assert_close(got + trained, full, rtol=0, atol=1e-12)
    assert folded_delta(state, list(range(R))) == {}
    assert complement(chosen, R) == [1, 3, 4, 6, 7]


def _uploads(indices, seed=10, dtype=torch.float64):
    return [build_state(len(k), seed=seed + i, dtype=dtype) for i, k in enumerate(indices)]


def _reference(states, indices, num_samples, previous, empty_dim="keep"):
    """Module by module: the sample-weighted average over the clients holding it."""
    out = {}
    for module, (d, k, is_conv) in MODULES.items():
        b_g = torch.zeros(d, R, dtype=torch.float64)
        a_g = torch.zeros(R, k, dtype=torch.float64)
        for j in range(R):
            holders = [i for i, chosen in enumerate(indices) if j in chosen]
            total = sum(num_samples[i] for i in holders)
            if not holders:
                if empty_dim == "keep":
                    b_g[:, j] = _column(previous, module, j)
                    a_g[j] = _row(previous, module, j)
                continue
            for i in holders:
                p = list(indices[i]).index(j)
                w = num_samples[i] / total
                for x in range(d):
                    b_g[x, j] += w * _column(states[i], module, p)[x]
                for y in range(k):
                    a_g[j, y] += w * _row(states[i], module, p)[y]
        tail = (1, 1) if is_conv else ()
        out[lora_a(module)] = a_g.reshape(R, k, *tail)
        out[lora_b(module)] = b_g.reshape(d, R, *tail)
    total = sum(num_samples)
    for key in DENSE:
        out[key] = sum(n / total * s[key].to(torch.float64) for n, s in zip(num_samples, states))
    return {key: out[key] for key in states[0]}


INDICES = [[0, 3, 5, 6], [1, 3], [3, 6], [0, 1, 2, 3, 5, 6]]  # module 4 and 7: nobody
COUNTS = [10, 30, 5, 20]


@pytest.mark.parametrize("empty_dim", ["keep", "zero"])
def test_merge_matches_the_per_module_reference(empty_dim):
    states = _uploads(INDICES)
    previous = build_state(R, seed=99, dtype=torch.float64)
    merged = fedplora_merge(states, INDICES, COUNTS, previous, empty_dim=empty_dim)
    assert_states_close(merged, _reference(states, INDICES, COUNTS, previous, empty_dim), 1e-12)
    for module in MODULES:  # the modules nobody trained
        for j in (4, 7):
            kept = (
                _column(previous, module, j)
                if empty_dim == "keep"
                else 0 * _column(previous, module, j)
            )
            assert torch.equal(_column(merged, module, j), kept)


def test_merge_keeps_the_clients_dtype_and_leaves_inputs_alone():
    states = _uploads(INDICES, dtype=torch.float32)
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    previous = build_state(R, seed=98)
    merged = fedplora_merge(states, INDICES, COUNTS, previous)
    assert all(v.dtype == torch.float32 for v in merged.values())
    for s, b in zip(states, before):
        assert_states_equal(s, b)
    reference = _reference(states, INDICES, COUNTS, previous)
    assert_states_close(merged, reference, 1e-5)


@pytest.mark.parametrize("empty_dim", ["keep", "zero"])
def test_first_rule_is_fedilora_merge(empty_dim):
    ranks = [4, 2, 2, 1]  # dimensions 4..7 nobody covers
    indices = [module_indices("first", r, R, 0, 1, i) for i, r in enumerate(ranks)]
    states = _uploads(indices, seed=40)
    previous = build_state(R, seed=41, dtype=torch.float64)
    ours = fedplora_merge(states, indices, COUNTS, previous, empty_dim=empty_dim)
    theirs = fedilora_merge(
        states, ranks, COUNTS, previous=previous, global_rank=R, empty_dim=empty_dim
    )
    assert_states_equal(ours, theirs)
    # and with the federation's ranks of the other tests
    indices = [list(range(r)) for r in RANKS]
    states = _uploads(indices, seed=50)
    ours = fedplora_merge(states, indices, NUM_SAMPLES, previous)
    assert_states_equal(ours, fedilora_merge(states, RANKS, NUM_SAMPLES, previous=previous))


def test_module_weights_by_hand():
    weights, trained = module_weights([[0, 2], [2, 3]], [1, 3], 5)
    expected = [[1.0, 0.0, 0.25, 0.0, 0.0], [0.0, 0.0, 0.75, 1.0, 0.0]]
    assert weights.tolist() == expected
    assert trained.tolist() == [True, False, True, True, False]


@pytest.mark.parametrize(
    ("indices", "words"),
    [
        ([[0, 0, 1, 2], [1, 3]], "distinct"),
        ([[0, 1, 2, 8], [1, 3]], "distinct and in"),
        ([[0, 1, 2], [1, 3]], "module indices"),
        ([[0, 1, 2, 3]], "index sets"),
    ],
)
def test_malformed_index_sets_raise(indices, words):
    states = _uploads([[0, 1, 2, 3], [0, 1]])
    with pytest.raises(ValueError, match=words):
        fedplora_merge(states, indices, [1, 2], build_state(R, seed=0, dtype=torch.float64))
