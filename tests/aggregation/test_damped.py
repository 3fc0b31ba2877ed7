"""The damped dimension-wise merge (aggregation/damped.py, docs/algorithms.md §1.10) against
explicit loops.

For clients ``i`` (rank ``r_i``, samples ``n_i``), ``W_j = sum_{i : r_i > j} n_i`` (0-based
``j``), ``W = sum_i n_i`` and ``lambda_j = 1 - d (1 - W_j / W)``:
``X_g[j] = lambda_j F_j + (1 - lambda_j) X_prev[j]`` with FediLoRA's average
``F_j = sum_{i : r_i > j} n_i X_i[j] / W_j`` (``X`` = rows of ``lora_A``, columns of
``lora_B``); an uncovered ``j`` keeps ``X_prev[j]``; dense keys are averaged with
``p_i = n_i / W``. Every reference below is written one module, dimension and client at a time
in float64, never through the package's stacking helpers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest
import torch
from lora_builders import (
    CONV,
    HEAD_B,
    HEAD_W,
    MODULES,
    NUM_SAMPLES,
    RANKS,
    assert_states_equal,
    build_state,
    client_states,
    clone_states,
    lora_a,
    lora_b,
)
from torch import Tensor

from aggregation import fedilora_merge, get_merger, lora_rank, rank_axis
from aggregation.damped import DampedMerger, damped_merge
from aggregation.diagnostics import diagnose
from fedsim.config import load_config
from fedsim.errors import ConfigError

# (ranks, sample counts): a high-rank minority, an unsorted mix with a rank-1 client, and equal
# ranks (every lambda_j is 1 there).
CASES = [
    (RANKS, NUM_SAMPLES),
    ([2, 4, 8, 8, 1], [7, 1, 12, 3, 9]),
    ([4, 4, 4], [5, 20, 75]),
]
CASE_IDS = ["8-8-4-2-2", "2-4-8-8-1", "equal-4"]
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}


# -- slow references -------------------------------------------------------------------------


def _axis(key: str) -> int:
    return 0 if ".lora_A." in key else 1


def _dim(state: Mapping[str, Tensor] | None, key: str, j: int, like: Tensor) -> Tensor:
    """Dimension ``j`` of ``key`` (A row / B column) in float64; zero past the state's rank or
    when ``state`` is None."""
    if state is None or j >= state[key].shape[_axis(key)]:
        return torch.zeros_like(like, dtype=torch.float64)
    return state[key].select(_axis(key), j).to(torch.float64)


def slow_lambdas(ranks: list[int], n: list[float], global_rank: int, damping: float) -> list[float]:
    total = float(sum(n))
    out = []
    for j in range(global_rank):
        covered = sum(n[i] for i in range(len(ranks)) if ranks[i] > j)
        out.append(1.0 - damping * (1.0 - covered / total))
    return out


def slow_weights(
    ranks: list[int], n: list[float], global_rank: int, damping: float
) -> list[list[float]]:
    """``w_ij = lambda_j n_i / W_j`` where ``r_i > j``, else 0."""
    lambdas = slow_lambdas(ranks, n, global_rank, damping)
    w = [[0.0] * global_rank for _ in ranks]
    for j in range(global_rank):
        covering = [i for i in range(len(ranks)) if ranks[i] > j]
        covered = sum(n[i] for i in covering)
        for i in covering:
            w[i][j] = lambdas[j] * n[i] / covered
    return w


def slow_damped(
    states: list[dict[str, Tensor]],
    ranks: list[int],
    n: list[float],
    global_rank: int,
    damping: float,
    previous: Mapping[str, Tensor] | None,
) -> dict[str, Tensor]:
    """The damped merge straight from the formula, in float64."""
    total = float(sum(n))
    out: dict[str, Tensor] = {}
    for key in states[0]:
        if ".lora_A." not in key and ".lora_B." not in key:
            out[key] = sum(
                (n[i] / total) * states[i][key].to(torch.float64) for i in range(len(states))
            )
            continue
        axis = _axis(key)
        shape = list(states[0][key].shape)
        shape[axis] = global_rank
        merged = torch.zeros(shape, dtype=torch.float64)
        for j in range(global_rank):
            column = merged.select(axis, j)
            prev = _dim(previous, key, j, column)
            covering = [i for i in range(len(states)) if ranks[i] > j]
            if not covering:
                column.copy_(prev)
                continue
            covered = sum(n[i] for i in covering)
            lam = 1.0 - damping * (1.0 - covered / total)
            average = torch.zeros_like(column)
            for i in covering:
                average += (n[i] / covered) * states[i][key].select(axis, j).to(torch.float64)
            column.copy_(lam * average + (1.0 - lam) * prev)
        out[key] = merged
    return out


def assert_matches(
    merged: Mapping[str, Tensor], expected: Mapping[str, Tensor], dtype: torch.dtype
) -> None:
    assert list(merged) == list(expected)
    tol = TOLERANCE[dtype]
    for key, want in expected.items():
        assert merged[key].dtype == dtype, key
        assert merged[key].shape == want.shape, key
        torch.testing.assert_close(merged[key].to(torch.float64), want, rtol=tol, atol=tol)


# -- 1. against the loop ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("damping", [0.0, 0.5, 1.0])
@pytest.mark.parametrize(("ranks", "n"), CASES, ids=CASE_IDS)
def test_damped_merge_matches_the_loop(ranks, n, damping, dtype) -> None:
    # R above every rank, so the top two dimensions are uncovered; the builders' CONV module
    # has 1x1-conv factors (4-D), so both rank-axis layouts and 4-D tensors are covered.
    global_rank = max(ranks) + 2
    states = client_states(ranks, dtype=dtype)
    previous = build_state(global_rank, seed=99, dtype=dtype)
    before = clone_states([*states, previous])
    merged = damped_merge(
        states, ranks, n, previous=previous, global_rank=global_rank, damping=damping
    )
    assert lora_rank(merged) == global_rank
    assert merged[lora_a(CONV)].dim() == 4 and merged[lora_b(CONV)].dim() == 4
    assert_matches(merged, slow_damped(states, ranks, n, global_rank, damping, previous), dtype)
    for state, old in zip([*states, previous], before, strict=True):
        assert_states_equal(state, old)  # inputs not mutated


@pytest.mark.parametrize("previous_rank", [None, 6], ids=["no-previous", "previous-rank-6"])
def test_missing_previous_dimensions_count_as_zero(previous_rank) -> None:
    states = client_states(dtype=torch.float64)
    previous = None if previous_rank is None else build_state(previous_rank, 7, torch.float64)
    merged = damped_merge(states, RANKS, NUM_SAMPLES, previous=previous, damping=0.5)
    expected = slow_damped(states, RANKS, NUM_SAMPLES, 8, 0.5, previous)
    assert_matches(merged, expected, torch.float64)


def test_merger_merge_is_damped_merge() -> None:
    states = client_states()
    previous = build_state(8, seed=99)
    direct = damped_merge(states, RANKS, NUM_SAMPLES, previous=previous, damping=0.3)
    merger = get_merger("fedilora_damped", damping=0.3)
    assert isinstance(merger, DampedMerger) and merger.damping == 0.3
    assert_states_equal(merger.merge(states, RANKS, NUM_SAMPLES, previous=previous), direct)


# -- 2. the two limits that are other merges -------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("ranks", "n"), CASES, ids=CASE_IDS)
def test_damping_zero_is_fedilora_keep(ranks, n, dtype) -> None:
    global_rank = max(ranks) + 2
    states = client_states(ranks, dtype=dtype)
    previous = build_state(global_rank, seed=99, dtype=dtype)
    damped = damped_merge(states, ranks, n, previous=previous, global_rank=global_rank, damping=0)
    fedilora = fedilora_merge(
        states, ranks, n, previous=previous, global_rank=global_rank, empty_dim="keep"
    )
    assert_states_equal(damped, fedilora)


@pytest.mark.parametrize("damping", [0.0, 0.3, 0.5, 1.0])
def test_equal_ranks_is_fedavg_for_any_damping(damping) -> None:
    ranks, n = [4, 4, 4], [5, 20, 75]
    states = client_states(ranks, dtype=torch.float64)
    previous = build_state(4, seed=99, dtype=torch.float64)
    merged = damped_merge(states, ranks, n, previous=previous, damping=damping)
    fedavg = {
        key: sum(w / 100 * s[key] for w, s in zip(n, states, strict=True)) for key in states[0]
    }
    assert_matches(merged, fedavg, torch.float64)
    # lambda_j = 1 - d * (1 - W / W) is exactly 1: nothing of previous leaks in.
    assert_states_equal(merged, fedilora_merge(states, ranks, n, previous=previous))


# -- 3. damping 1: zero-padding's weights, the rest stays at previous -----------------------


@pytest.mark.parametrize(("ranks", "n"), CASES[:2], ids=CASE_IDS[:2])
def test_damping_one_moves_previous_by_the_sample_weighted_updates(ranks, n) -> None:
    global_rank = max(ranks)
    states = client_states(ranks, dtype=torch.float64)
    previous = build_state(global_rank, seed=99, dtype=torch.float64)
    merged = damped_merge(states, ranks, n, previous=previous, damping=1.0)
    total = float(sum(n))
    for module in MODULES:
        for key in (lora_a(module), lora_b(module)):
            for j in range(global_rank):
                prev = _dim(previous, key, j, previous[key].select(_axis(key), 0))
                step = torch.zeros_like(prev)
                for i in range(len(states)):
                    if ranks[i] > j:
                        step += (n[i] / total) * (_dim(states[i], key, j, prev) - prev)
                change = _dim(merged, key, j, prev) - prev
                torch.testing.assert_close(change, step, rtol=1e-12, atol=1e-12)
    # ... which are zero-padding's per-dimension weights n_i / W.
    zeropad = get_merger("zeropad").dimension_weights(ranks, n, n, global_rank)
    damped = DampedMerger(1.0).dimension_weights(ranks, n, n, global_rank)
    torch.testing.assert_close(damped, zeropad, rtol=1e-15, atol=0)


# -- 4. uncovered dimensions -----------------------------------------------------------------


def _uncovered(merged: Mapping[str, Tensor], previous: Mapping[str, Tensor], first: int):
    for module in MODULES:
        yield merged[lora_a(module)][first:], previous[lora_a(module)][first:]
        yield merged[lora_b(module)][:, first:], previous[lora_b(module)][:, first:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("damping", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_uncovered_dimension_keeps_previous_to_rounding(damping, dtype) -> None:
    states = client_states([4, 2], dtype=dtype)
    previous = build_state(8, seed=99, dtype=dtype)
    merged = damped_merge(states, [4, 2], [1, 3], previous=previous, damping=damping)
    eps = torch.finfo(dtype).eps
    for got, want in _uncovered(merged, previous, 4):
        # lambda * prev + (1 - lambda) * prev: at most one rounding of the result away.
        assert bool(((got - want).abs() <= eps * want.abs()).all())
    torch.testing.assert_close(merged[HEAD_B], (states[0][HEAD_B] + 3 * states[1][HEAD_B]) / 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "damping",
    [
        0.0,
        0.5,
        1.0,
        0.3,
    ],
)
def test_uncovered_dimension_keeps_previous_exactly(damping, dtype) -> None:
    # FediLoRA's empty_dim="keep" copies previous bit for bit (test_fedilora.py); the damped
    # merge's docstring promises the same ("keeps its previous value").
    states = client_states([4, 2], dtype=dtype)
    previous = build_state(8, seed=99, dtype=dtype)
    merged = damped_merge(states, [4, 2], [1, 3], previous=previous, damping=damping)
    for got, want in _uncovered(merged, previous, 4):
        assert torch.equal(got, want)


# -- 5. streaming ----------------------------------------------------------------------------
#
# Bound (mirrors tests/aggregation/test_streaming.py, whose stream/batch bound for a weighted
# sum of S terms is (S + 2) eps * sum of |weight * term|). Both paths compute FediLoRA's average
# F (stream minus batch within (S + 1) eps * sum_i (n_i / W_j) |x_ij| there) and then the same
# float blend fl(fl(lam F) + fl((1 - lam) prev)), whose own rounding is at most
# 2 u (lam |F| + (1 - lam) |prev|) per path. Together: within (S + 3) eps times
# sum_i w_ij |x_ij| + (1 - sum_i w_ij) |prev_j|, with the damped weights w_ij = lam_j n_i / W_j:
# the blended output as a weighted sum of S + 1 terms (the clients and previous), i.e. the
# streaming test's (terms + 2) eps. Dense keys are a plain p_i average of S terms: (S + 2) eps.
# An uncovered dimension has no client term and the same value in both paths (previous, then
# the same blend), so its difference must be 0 however small its bound.


def _padded(key: str, tensor: Tensor | None, rank: int, like: Tensor) -> Tensor:
    """Rank axis first, zero-padded to ``rank``, float64 (zeros for None)."""
    if tensor is None:
        return torch.zeros_like(like, dtype=torch.float64)
    first = tensor.to(torch.float64).movedim(rank_axis(key), 0)
    out = torch.zeros((rank, *first.shape[1:]), dtype=torch.float64)
    out[: first.shape[0]] = first
    return out


def stream_bounds(states, ranks, n, global_rank, damping, previous) -> dict[str, Tensor]:
    weights = torch.tensor(slow_weights(ranks, n, global_rank, damping), dtype=torch.float64)
    p = torch.tensor(n, dtype=torch.float64) / sum(n)
    eps = torch.finfo(states[0][HEAD_W].dtype).eps
    clients = len(states)
    out = {}
    for key in states[0]:
        if rank_axis(key) is None:
            mag = sum(w * s[key].to(torch.float64).abs() for w, s in zip(p, states, strict=True))
            out[key] = (clients + 2) * eps * mag
            continue
        stacked = torch.stack([_padded(key, s[key], global_rank, None).abs() for s in states])
        mag = torch.einsum("sr,sr...->r...", weights, stacked)
        prev = _padded(key, None if previous is None else previous[key], global_rank, mag)
        rest = (1 - weights.sum(dim=0)).view(-1, *[1] * (mag.dim() - 1))
        mag = mag + rest * prev.abs()
        out[key] = ((clients + 3) * eps * mag).movedim(0, rank_axis(key))
    return out


def run_stream(merger, states, ranks, n, previous, global_rank) -> dict[str, Tensor]:
    stream = merger.stream(previous, global_rank, states[0])
    for state, rank, count in zip(states, ranks, n, strict=True):
        stream.add(state, rank, count)
    assert stream.count == len(states)
    return stream.result()


def assert_within(stream, batch, bounds) -> None:
    assert list(stream) == list(batch)
    for key in batch:
        assert stream[key].shape == batch[key].shape, key
        assert stream[key].dtype == batch[key].dtype, key
        diff = (stream[key].to(torch.float64) - batch[key].to(torch.float64)).abs()
        excess = diff - bounds[key]
        assert bool((excess <= 0).all()), (key, float(excess.max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("damping", [0.0, 0.3, 1.0])
@pytest.mark.parametrize(
    ("global_rank", "with_previous"), [(8, True), (10, True), (10, False)]
)  # R = 10 leaves dimensions 8, 9 uncovered
def test_stream_matches_batch(dtype, damping, global_rank, with_previous) -> None:
    states = client_states(dtype=dtype)
    # The server's own previous adapter, in float64 like test_streaming.py's.
    previous = build_state(global_rank, seed=99, dtype=torch.float64) if with_previous else None
    merger = DampedMerger(damping)
    batch = merger.merge(states, RANKS, NUM_SAMPLES, previous=previous, global_rank=global_rank)
    stream = run_stream(merger, states, RANKS, NUM_SAMPLES, previous, global_rank)
    bounds = stream_bounds(states, RANKS, NUM_SAMPLES, global_rank, damping, previous)
    assert_within(stream, batch, bounds)
    assert lora_rank(stream) == global_rank


def test_stream_bound_catches_damping_off_by_a_tenth_of_a_percent() -> None:
    states = client_states()
    previous = build_state(8, seed=99, dtype=torch.float64)
    batch = DampedMerger(0.5).merge(states, RANKS, NUM_SAMPLES, previous=previous)
    stream = run_stream(DampedMerger(0.5005), states, RANKS, NUM_SAMPLES, previous, 8)
    bounds = stream_bounds(states, RANKS, NUM_SAMPLES, 8, 0.5, previous)
    with pytest.raises(AssertionError):
        assert_within(stream, batch, bounds)


# -- 6. dimension weights and diagnostics ----------------------------------------------------


@pytest.mark.parametrize("damping", [0.0, 0.3, 1.0])
@pytest.mark.parametrize(("ranks", "n"), CASES, ids=CASE_IDS)
def test_dimension_weights_are_lambda_times_fedilora(ranks, n, damping) -> None:
    global_rank = max(ranks) + 2
    got = DampedMerger(damping).dimension_weights(ranks, n, n, global_rank)
    want = torch.tensor(slow_weights(ranks, n, global_rank, damping), dtype=torch.float64)
    assert got.shape == (len(ranks), global_rank)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    assert bool((got[:, max(ranks) :] == 0).all())


def _dimension_rows(state: Mapping[str, Tensor] | None, module: str, j: int, like) -> Tensor:
    """A row j and B column j of one module, flattened together (float64, zero past rank)."""
    a, b = lora_a(module), lora_b(module)
    return torch.cat(
        [
            _dim(state, a, j, like[a].select(0, 0)).reshape(-1),
            _dim(state, b, j, like[b].select(1, 0)).reshape(-1),
        ]
    )


@pytest.mark.parametrize("damping", [0.3, 1.0])
@pytest.mark.parametrize(("ranks", "n"), CASES[:2], ids=CASE_IDS[:2])
def test_diagnostics_add_up_to_the_damped_update(ranks, n, damping) -> None:
    global_rank = max(ranks) + 1  # one uncovered dimension
    states = client_states(ranks, dtype=torch.float64)
    previous = build_state(global_rank, seed=99, dtype=torch.float64)
    merger = DampedMerger(damping)
    merged = merger.merge(states, ranks, n, previous=previous, global_rank=global_rank)
    d = diagnose(merger, states, ranks, n, global_rank, previous, new=merged)
    w = slow_weights(ranks, n, global_rank, damping)
    like = states[0]
    contribution_sq = [0.0] * len(states)
    for j in range(global_rank):
        update_sq = 0.0
        for module in MODULES:
            prev = _dimension_rows(previous, module, j, like)
            change = _dimension_rows(merged, module, j, like) - prev
            update_sq += float(change.square().sum())
            summed = torch.zeros_like(prev)
            for i in range(len(states)):
                if ranks[i] > j:
                    part = w[i][j] * (_dimension_rows(states[i], module, j, like) - prev)
                    summed += part
                    contribution_sq[i] += float(part.square().sum())
            if j < max(ranks):
                # The clients' contributions are the whole update of a covered dimension.
                torch.testing.assert_close(summed, change, rtol=1e-10, atol=1e-12)
        assert float(d.update_norm[j]) == pytest.approx(math.sqrt(update_sq), rel=1e-12, abs=1e-15)
    assert float(d.update_norm[-1]) == pytest.approx(0.0, abs=1e-12)  # uncovered: kept
    want = [math.sqrt(c) for c in contribution_sq]
    assert d.contribution.tolist() == pytest.approx(want, rel=1e-12)
    lambdas = slow_lambdas(ranks, n, global_rank, damping)
    covered = [lam if j < max(ranks) else 0.0 for j, lam in enumerate(lambdas)]
    assert d.merge_weight.tolist() == pytest.approx(covered, rel=1e-12)


# -- 7. bad damping --------------------------------------------------------------------------


@pytest.mark.parametrize("damping", [-0.1, 1.5, "x", float("nan")])
def test_bad_damping_raises_naming_the_key(damping) -> None:
    states = client_states([2])
    with pytest.raises(ValueError, match=r"aggregation\.damping"):
        damped_merge(states, [2], [1], damping=damping)
    with pytest.raises(ValueError, match=r"aggregation\.damping"):
        DampedMerger(damping)
    with pytest.raises(ValueError, match=r"aggregation\.damping"):
        get_merger("fedilora_damped", damping=damping)


def test_config_rejects_damping_out_of_range() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["aggregation.damping=2"])
    assert info.value.key == "aggregation.damping"
    assert "aggregation.damping" in str(info.value)
    assert "[0, 1]" in str(info.value)
