"""raFLoRA rank-partitioned aggregation (docs/algorithms.md §6.2): the product against slow
float64 references in its partition and its per-dimension form, the SVD, the identities with
FlexLoRA and FediLoRA, the options, the config rules, and one in-process run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lora_builders import (
    DENSE,
    MODULES,
    VALUE,
    build_state,
    client_states,
    dense_average,
    lora_a,
    lora_b,
    product,
    scale_b,
    truncate_all,
)
from mlflow.tracking import MlflowClient

import fedsim
from actors.executor import LocalExecutor
from aggregation import (
    MERGERS,
    RaFLoRAMerger,
    get_merger,
    lora_rank,
    merge_lora_state_dicts,
    raflora_merge,
    raflora_products,
    rank_partition_weights,
    rank_partitions,
)
from fedsim.config import ConfigError, load_config

RANKS = [6, 4, 4, 2, 1]
COUNTS = [10.0, 30.0, 20.0, 5.0, 35.0]
R = 8  # above every client rank: dimensions 6 and 7 are covered by nobody


def _states(ranks=RANKS, seed=0) -> list[dict[str, torch.Tensor]]:
    return [build_state(r, seed=seed + i, dtype=torch.float64) for i, r in enumerate(ranks)]


def _prefix(module: str) -> str:
    return module + "."


def _matrices(state, module):
    """``(A, B)`` of one module as nested Python lists (k' columns, conv factors flattened)."""
    a = state[lora_a(module)].to(torch.float64)
    b = state[lora_b(module)].to(torch.float64)
    return a.reshape(a.shape[0], -1).tolist(), b.reshape(b.shape[0], -1).tolist()


def _outer_add(out, scale, b_col, a_row):
    """``out += scale * b_col a_row^T`` element by element."""
    for p in range(len(b_col)):
        for q in range(len(a_row)):
            out[p][q] += scale * b_col[p] * a_row[q]


def _previous_tail(out, previous, module, start):
    """Add the previous global's dimensions ``start..`` (the uncovered ones) element by element."""
    if previous is None:
        return
    a, b = _matrices(previous, module)
    for j in range(start, len(a)):
        _outer_add(out, 1.0, [row[j] for row in b], a[j])


def partition_reference(states, ranks, counts, module, *, previous=None, by="samples"):
    """dW by the partition form (6.2.2), a loop over partitions, coverers and elements."""
    d, k = MODULES[module][0], MODULES[module][1]
    out = [[0.0] * k for _ in range(d)]
    mass = list(counts) if by == "samples" else [1.0] * len(ranks)
    distinct = sorted(set(ranks))
    for m, top in enumerate(distinct):
        low = distinct[m - 1] if m > 0 else 0
        cover = [i for i, r in enumerate(ranks) if r >= top]  # C_(m)
        total = sum(mass[i] for i in cover)
        for i in cover:
            a, b = _matrices(states[i], module)
            for j in range(low, top):  # P_(m), 0-based
                _outer_add(out, mass[i] / total, [row[j] for row in b], a[j])
    _previous_tail(out, previous, module, max(ranks))
    return torch.tensor(out, dtype=torch.float64)


def dimension_reference(states, ranks, counts, module, *, previous=None, by="samples"):
    """dW by the per-dimension form (6.2.3), a loop over dimensions, coverers and elements."""
    d, k = MODULES[module][0], MODULES[module][1]
    out = [[0.0] * k for _ in range(d)]
    mass = list(counts) if by == "samples" else [1.0] * len(ranks)
    for j in range(max(ranks)):
        cover = [i for i, r in enumerate(ranks) if r > j]  # C_j
        total = sum(mass[i] for i in cover)
        for i in cover:
            a, b = _matrices(states[i], module)
            _outer_add(out, mass[i] / total, [row[j] for row in b], a[j])
    _previous_tail(out, previous, module, max(ranks))
    return torch.tensor(out, dtype=torch.float64)


def spread_reference(states, ranks, counts, module):
    """The right-hand side of (6.2.6): 1/2 sum_j sum_{i,l in C_j} w_ij w_lj (b_ij - b_lj)(a_ij -
    a_lj)^T, element by element."""
    d, k = MODULES[module][0], MODULES[module][1]
    out = [[0.0] * k for _ in range(d)]
    factors = [_matrices(state, module) for state in states]
    for j in range(max(ranks)):
        cover = [i for i, r in enumerate(ranks) if r > j]
        total = sum(counts[i] for i in cover)
        for i in cover:
            for l in cover:  # noqa: E741 - the formula's name
                (a_i, b_i), (a_l, b_l) = factors[i], factors[l]
                b_diff = [b_i[p][j] - b_l[p][j] for p in range(d)]
                a_diff = [a_i[j][q] - a_l[j][q] for q in range(k)]
                _outer_add(out, 0.5 * counts[i] * counts[l] / total**2, b_diff, a_diff)
    return torch.tensor(out, dtype=torch.float64)


def _close(actual, expected, tol=1e-10):
    torch.testing.assert_close(actual.to(torch.float64), expected, atol=tol, rtol=tol)


# -- the weights and the partitions -----------------------------------------------------------


def test_rank_partitions_and_weights_by_hand() -> None:
    assert rank_partitions([4, 1, 2, 4]) == [(0, 1), (1, 2), (2, 4)]
    weights, covered = rank_partition_weights([4, 2, 1], [10, 30, 60], 5)
    expected = torch.tensor(
        [
            [0.1, 10 / 40, 1.0, 1.0, 0.0],
            [0.3, 30 / 40, 0.0, 0.0, 0.0],
            [0.6, 0.0, 0.0, 0.0, 0.0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(weights, expected)
    assert covered.tolist() == [True, True, True, True, False]
    by_clients, _ = rank_partition_weights([4, 2, 1], [10, 30, 60], 5, by="clients")
    torch.testing.assert_close(by_clients[:, 0], torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(by_clients[:2, 1], torch.full((2,), 0.5, dtype=torch.float64))
    # the merger reports the same w_ij to the merge diagnostics
    merger = RaFLoRAMerger(partition_weights="clients")
    torch.testing.assert_close(
        merger.dimension_weights([4, 2, 1], [10, 30, 60], [0, 0, 0], 5), by_clients
    )


# -- the product dW ---------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["samples", "clients"])
def test_product_matches_the_partition_reference(by: str) -> None:
    states, previous = _states(), build_state(R, seed=40, dtype=torch.float64)
    products = raflora_products(
        states, RANKS, COUNTS, previous=previous, global_rank=R, partition_weights=by
    )
    for module in MODULES:
        expected = partition_reference(states, RANKS, COUNTS, module, previous=previous, by=by)
        _close(products[_prefix(module)], expected)


def test_partition_form_and_dimension_form_agree() -> None:
    states, previous = _states(seed=7), build_state(R, seed=41, dtype=torch.float64)
    products = raflora_products(states, RANKS, COUNTS, previous=previous, global_rank=R)
    for module in MODULES:
        by_partition = partition_reference(states, RANKS, COUNTS, module, previous=previous)
        by_dimension = dimension_reference(states, RANKS, COUNTS, module, previous=previous)
        _close(by_partition, by_dimension)
        _close(products[_prefix(module)], by_dimension)


def test_client_count_weighting_differs_from_sample_weighting() -> None:
    states = _states(seed=3)
    clients = raflora_products(states, RANKS, COUNTS, partition_weights="clients")
    samples = raflora_products(states, RANKS, COUNTS)
    for module in MODULES:
        ones = [1.0] * len(RANKS)
        # "clients" is "samples" with every n_i = 1
        _close(clients[_prefix(module)], dimension_reference(states, RANKS, ones, module))
        assert (clients[_prefix(module)] - samples[_prefix(module)]).abs().max() > 1e-2


def test_uncovered_partition_keeps_the_previous_global_part() -> None:
    ranks, counts = [2, 2], [1.0, 3.0]
    states = _states(ranks, seed=11)
    for previous_rank in (5, 3):  # a previous of full rank, and one of lower rank than R
        previous = build_state(previous_rank, seed=42, dtype=torch.float64)
        keep = raflora_products(states, ranks, counts, previous=previous, global_rank=5)
        zero = raflora_products(
            states, ranks, counts, previous=previous, global_rank=5, empty_dim="zero"
        )
        for module in MODULES:
            average = sum(c / 4.0 * product(s, module) for c, s in zip(counts, states))
            a = previous[lora_a(module)].reshape(previous_rank, -1)
            b = previous[lora_b(module)].reshape(-1, previous_rank)
            _close(keep[_prefix(module)], average + b[:, 2:] @ a[2:])
            _close(zero[_prefix(module)], average)
    # without a previous adapter "keep" has nothing to keep
    bare = raflora_products(states, ranks, counts, global_rank=5)
    for module in MODULES:
        _close(bare[_prefix(module)], zero[_prefix(module)])


# -- the SVD and the redistribution -----------------------------------------------------------


def test_global_factors_are_the_balanced_truncated_svd_and_clients_get_the_best_rank_r_part():
    ranks, counts, rank = [3, 2, 1], [5.0, 3.0, 2.0], 3  # VALUE is 7 x 5: rank-3 SVD truncates
    states = _states(ranks, seed=5)
    merged = raflora_merge(states, ranks, counts, global_rank=rank, svd="exact")
    reference = partition_reference(states, ranks, counts, VALUE).numpy()
    u, s, vh = np.linalg.svd(reference)
    a = merged[lora_a(VALUE)]
    b = merged[lora_b(VALUE)]
    # balanced: B^T B = A A^T = diag(s[:R]); the product is the rank-R part of dW
    _close(b.T @ b, torch.tensor(np.diag(s[:rank])))
    _close(a @ a.T, torch.tensor(np.diag(s[:rank])))
    for r in (1, 2, 3):  # a rank-r client receives U[:, :r] diag(sqrt s), diag(sqrt s) V^T
        view = RaFLoRAMerger().redistribute(merged, r)
        best = (u[:, :r] * s[:r]) @ vh[:r]
        _close(product(view, VALUE), torch.tensor(best))
        assert view[lora_a(VALUE)].shape == (r, 5)
    for key in DENSE:  # dense keys: p_i
        _close(merged[key], dense_average(states, counts, key))


def test_equal_ranks_reduce_to_flexlora() -> None:
    counts = [10.0, 30.0, 20.0]
    for ranks, rank in (([4, 4, 4], 4), ([2, 2, 2], 4)):
        states = _states(ranks, seed=9)
        flex = get_merger("flexlora", svd="exact").merge(states, ranks, counts, global_rank=rank)
        ra = get_merger("raflora", svd="exact").merge(states, ranks, counts, global_rank=rank)
        for key in flex:
            _close(ra[key], flex[key].to(torch.float64))
    # below R with a previous adapter: FlexLoRA ignores it, raFLoRA with empty_dim=zero too
    previous = build_state(4, seed=43, dtype=torch.float64)
    flex = get_merger("flexlora", svd="exact").merge(states, ranks, counts, previous, rank)
    zero = RaFLoRAMerger(empty_dim="zero", svd="exact").merge(states, ranks, counts, previous, rank)
    keep = RaFLoRAMerger(svd="exact").merge(states, ranks, counts, previous, rank)
    for module in MODULES:
        _close(product(zero, module), product(flex, module))
        assert (product(keep, module) - product(flex, module)).abs().max() > 1e-3


# -- the identity with FediLoRA ---------------------------------------------------------------


def test_difference_from_fedilora_is_the_coverers_spread() -> None:
    states, previous = _states(seed=13), build_state(R, seed=44, dtype=torch.float64)
    fedilora = get_merger("fedilora").merge(states, RANKS, COUNTS, previous, R)
    products = raflora_products(states, RANKS, COUNTS, previous=previous, global_rank=R)
    for module in MODULES:
        gap = products[_prefix(module)] - product(fedilora, module)
        spread = spread_reference(states, RANKS, COUNTS, module)
        _close(gap, spread)
        assert spread.abs().max() > 0.1  # the clients differ: the identity is not 0 = 0


def test_no_difference_from_fedilora_with_one_coverer_or_agreeing_coverers() -> None:
    ranks, counts = [4, 2, 2, 1], [1.0, 2.0, 3.0, 4.0]
    shared = build_state(4, seed=17, dtype=torch.float64)
    agreeing = truncate_all(shared, ranks)  # equal on every dimension two clients share
    other = build_state(4, seed=18, dtype=torch.float64)
    for module in MODULES:  # dimensions 2, 3 have one coverer: change them freely
        agreeing[0][lora_a(module)][2:] = other[lora_a(module)][2:]
        agreeing[0][lora_b(module)][:, 2:] = other[lora_b(module)][:, 2:]
    for states, rs, ns in ((agreeing, ranks, counts), ([other], [4], [7.0])):
        fedilora = get_merger("fedilora").merge(states, rs, ns, global_rank=4)
        products = raflora_products(states, rs, ns, global_rank=4)
        for module in MODULES:
            _close(products[_prefix(module)], product(fedilora, module))


# -- scaling, dtypes, registration -------------------------------------------------------------


def test_rank_scaling_is_folded_before_the_partitioned_average() -> None:
    ranks, counts = [4, 2], [10.0, 30.0]
    states = _states(ranks, seed=21)
    scalings = [16.0 / r for r in ranks]  # peft's alpha / r_i
    merged = merge_lora_state_dicts(
        states, ranks, counts, method="raflora", global_rank=32, scalings=scalings, svd="exact"
    )
    scaled = [scale_b(s, c) for s, c in zip(states, scalings)]
    for module in MODULES:  # R = 32 > min(d, k): the SVD keeps all of dW
        _close(product(merged, module), dimension_reference(scaled, ranks, counts, module))


def test_half_precision_is_merged_in_float32_and_cast_back() -> None:
    states = client_states([4, 2], dtype=torch.bfloat16)
    merged = raflora_merge(states, [4, 2], [1.0, 3.0], global_rank=4, svd="exact")
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    wide = [{k: v.to(torch.float64) for k, v in s.items()} for s in states]
    exact = raflora_merge(wide, [4, 2], [1.0, 3.0], global_rank=4, svd="exact")
    for module in MODULES:
        _close(product(merged, module), product(exact, module), tol=5e-2)


def test_flags_registration_and_no_streaming() -> None:
    assert MERGERS["raflora"] == "aggregation.raflora:RaFLoRAMerger"
    cls = RaFLoRAMerger
    assert (cls.needs_pairs, cls.linear_in_factors, cls.fixed_rank) == (True, False, True)
    assert (cls.fresh_adapter_each_round, cls.streams, cls.dp_weights) == (False, False, None)
    with pytest.raises(NotImplementedError, match="'raflora'"):
        RaFLoRAMerger().stream(None, 8, build_state(8, seed=0))
    # the global rank defaults to max(ranks), or the previous adapter's rank if larger
    assert lora_rank(RaFLoRAMerger().merge(_states(), RANKS, COUNTS)) == max(RANKS)
    previous = build_state(R, seed=45, dtype=torch.float64)
    assert lora_rank(RaFLoRAMerger().merge(_states(), RANKS, COUNTS, previous)) == R


def test_bad_options_are_refused() -> None:
    for option in ({"partition_weights": "equal"}, {"empty_dim": "drop"}, {"svd": "qr"}):
        name = next(iter(option))
        with pytest.raises(ValueError, match=f"{name} must be one of"):
            RaFLoRAMerger(**option)
        with pytest.raises(ValueError, match=f"{name} must be one of"):
            raflora_merge(_states(), RANKS, COUNTS, **option)
    with pytest.raises(ValueError, match="does not accept options"):
        get_merger("raflora", damping=0.5)


@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        (["aggregation.partition_weights=equal"], "aggregation.partition_weights", "'equal'"),
        (["aggregation.empty_dim=drop"], "aggregation.empty_dim", "'drop'"),
        (["server.optimizer=fedadam"], "server.optimizer", "re-derived by an SVD"),
        (["privacy.enabled=true"], "privacy.enabled", "raFLoRA hands out the SVD factors"),
        (["sharing.policy=A"], "sharing.policy", "needs both A and B"),
        (["pruning.gamma=0.1"], "pruning.gamma", "cannot take that"),
    ],
)
def test_config_refuses_what_does_not_compose(overrides, key, words) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["aggregation.method=raflora", *overrides])
    assert info.value.key == key
    assert words in str(info.value) and "\n" not in str(info.value)


def test_config_options_reach_the_merger() -> None:
    from fedsim.config.registry import build_merger

    cfg = load_config(
        None,
        [
            "aggregation.method=raflora",
            "aggregation.partition_weights=clients",
            "aggregation.empty_dim=zero",
            "aggregation.svd=exact",
        ],
    )
    merger = build_merger(cfg)
    assert isinstance(merger, RaFLoRAMerger)
    assert (merger.partition_weights, merger.empty_dim, merger.svd) == ("clients", "zero", "exact")


# -- one run ----------------------------------------------------------------------------------


@pytest.mark.slow  # a whole run: CI runs it, the quick loop does not
@pytest.mark.usefixtures("restore_threads")
def test_an_in_process_run_merges_with_raflora_and_logs_its_metrics(experiment_config) -> None:
    cfg = experiment_config("raflora")("aggregation.method=raflora", "rounds=2")
    run = fedsim.run(cfg, executor=LocalExecutor())
    assert [h["round"] for h in run.history] == [0, 1, 2]
    assert all(np.isfinite(h["global/accuracy"]) for h in run.history)
    assert [m["round"] for m in run.merge] == [1, 2]
    for rows, dims in zip(run.clients[1:], run.merge):
        ranks = [r["rank"] for r in rows if r["status"] == "ok"]
        # raFLoRA's weights of a covered dimension sum to 1
        assert dims["merge_weight"][: max(ranks)] == pytest.approx([1.0] * max(ranks))
    metrics = MlflowClient(run.tracking_uri).get_run(run.run_id).data.metrics
    assert "global/accuracy" in metrics and "merge/max_share" in metrics
