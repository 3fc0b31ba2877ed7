"""Streaming merges against the batch merges, the arrival-order buffer, and their errors.

Error bound used throughout (``stream_bound``). Let ``u`` be the unit roundoff of the working
dtype (``eps / 2``; float32 for float32 inputs, float64 for float64 ones) and ``S`` the number
of clients. Per output element with weights ``w_i`` (``w_i >= 0``, summing to 1 over the
clients that hold the element):
* the batch merge rounds each ``w_i`` to the working dtype (``<= u`` relative), each product
  ``w_i x_i`` (``<= u``) and sums ``S`` terms (``<= (S - 1) u`` times the sum of magnitudes), so
  ``|batch - exact| <= (S + 1) u * sum_i w_i |x_i|`` to first order;
* the stream sums ``n_i x_i`` in the same working dtype (each product ``<= u``, ``S - 1``
  additions ``<= (S - 1) u`` of the magnitudes ``n_i |x_i|``) and divides once by the float64
  total (``<= u``): ``|stream - exact| <= (S + 1) u * sum_i w_i |x_i|`` as well.
Hence ``|stream - batch| <= (2 S + 2) u * sum_i w_i |x_i| = (S + 1) eps * sum_i w_i |x_i|``.
The test allows ``(S + 2) * eps``, one ``eps`` of headroom for second-order terms (measured
differences are far below: worst cases add the rounding errors of every step with one sign,
real ones partly cancel). Elements no
client holds have a zero sum of magnitudes, so the two paths must agree on them exactly (an
uncovered FediLoRA dimension copies ``previous`` or is zero in both). With 5 clients the bound
is ``7 * eps32 ~ 8e-7`` relative to the magnitude, so a client weight wrong by 0.1% already
exceeds it (``test_bound_catches_a_weight_off_by_a_tenth_of_a_percent``).
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import pytest
import torch
from lora_builders import (
    HEAD_B,
    HEAD_W,
    MODULES,
    NUM_SAMPLES,
    QUERY,
    RANKS,
    build_state,
    client_states,
    clone_states,
    lora_a,
    lora_b,
)
from torch import Tensor

from aggregation import (
    MERGERS,
    InOrder,
    StreamingMerge,
    UpdateRejected,
    dimension_weights,
    get_merger,
    hetlora_weights,
    lora_rank,
    merger_class,
    rank_axis,
)

STREAMING = ("zeropad", "fedilora", "fedilora_damped", "hetlora", "flora")


def run_stream(
    merger, states, ranks, num_samples, *, previous=None, global_rank=None, template=None
) -> dict[str, Tensor]:
    stream = merger.stream(previous, global_rank, template if template is not None else states[0])
    for state, rank, count in zip(states, ranks, num_samples, strict=True):
        stream.add(state, rank, count)
    assert stream.count == len(states)
    return stream.result()


def padded(key: str, tensor: Tensor, rank: int) -> Tensor:
    """Zero-pad by hand (float64), rank axis first: ``(rank, *rest)``."""
    rank_first = tensor.to(torch.float64).movedim(rank_axis(key), 0)
    out = torch.zeros((rank, *rank_first.shape[1:]), dtype=torch.float64)
    out[: rank_first.shape[0]] = rank_first
    return out


def magnitude(
    states: list[dict[str, Tensor]], weights: Tensor, num_samples: list[float], global_rank: int
) -> dict[str, Tensor]:
    """``sum_i w_ij |x_ij|`` per element (float64): LoRA keys with ``weights`` (|S| x R), dense
    keys with ``p_i``."""
    p = torch.tensor(num_samples, dtype=torch.float64) / sum(num_samples)
    out = {}
    for key in states[0]:
        if rank_axis(key) is None:
            out[key] = sum(w * s[key].to(torch.float64).abs() for w, s in zip(p, states))
            continue
        stacked = torch.stack([padded(key, s[key], global_rank).abs() for s in states])
        total = torch.einsum("sr,sr...->r...", weights, stacked)  # (R, *rest)
        out[key] = total.movedim(0, rank_axis(key))
    return out


def stream_bound(reference_magnitude: Tensor, dtype: torch.dtype, clients: int) -> Tensor:
    """``(S + 2) * eps * sum_i w_i |x_i|``, see the module docstring."""
    return (clients + 2) * torch.finfo(dtype).eps * reference_magnitude


def assert_within_bound(
    stream: Mapping[str, Tensor], batch: Mapping[str, Tensor], mags: Mapping[str, Tensor]
) -> None:
    assert list(stream) == list(batch)
    for key in batch:
        assert stream[key].shape == batch[key].shape, key
        assert stream[key].dtype == batch[key].dtype, key
        diff = (stream[key].to(torch.float64) - batch[key].to(torch.float64)).abs()
        bound = stream_bound(mags[key], batch[key].dtype, len(NUM_SAMPLES))
        excess = diff - bound
        assert bool((excess <= 0).all()), (key, float(excess.max()))


def weight_matrix(name: str, states, ranks, num_samples, global_rank: int) -> Tensor:
    """The |S| x R weights each method puts on client i's dimension j."""
    if name == "fedilora":
        return dimension_weights(ranks, num_samples, global_rank)[0]
    if name == "hetlora":
        per_client = hetlora_weights(states, num_samples)
    else:
        per_client = torch.tensor(num_samples, dtype=torch.float64) / sum(num_samples)
    return per_client[:, None].expand(len(states), global_rank)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["zeropad", "hetlora"])
@pytest.mark.parametrize("global_rank", [8, 10])
def test_padded_streams_match_batch(name: str, dtype: torch.dtype, global_rank: int) -> None:
    states = client_states(dtype=dtype)
    before = clone_states(states)
    merger = get_merger(name)
    batch = merger.merge(states, RANKS, NUM_SAMPLES, global_rank=global_rank)
    stream = run_stream(merger, states, RANKS, NUM_SAMPLES, global_rank=global_rank)
    weights = weight_matrix(name, states, RANKS, NUM_SAMPLES, global_rank)
    assert_within_bound(stream, batch, magnitude(states, weights, NUM_SAMPLES, global_rank))
    assert lora_rank(stream) == global_rank
    for state, old in zip(states, before, strict=True):
        for key in old:
            assert torch.equal(state[key], old[key])  # inputs not mutated


def previous_state(rank: int) -> dict[str, Tensor]:
    return build_state(rank, seed=99, dtype=torch.float64)  # the server's own, wider dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("empty_dim", ["keep", "zero"])
@pytest.mark.parametrize(
    ("global_rank", "previous_rank"),
    [(8, None), (8, 8), (10, None), (10, 10), (10, 9)],  # R = 10 leaves dimensions 8, 9 empty
)
def test_fedilora_stream_matches_batch(
    dtype: torch.dtype, empty_dim: str, global_rank: int, previous_rank: int | None
) -> None:
    states = client_states(dtype=dtype)
    previous = previous_state(previous_rank) if previous_rank else None
    merger = get_merger("fedilora", empty_dim=empty_dim)
    batch = merger.merge(states, RANKS, NUM_SAMPLES, previous=previous, global_rank=global_rank)
    stream = run_stream(
        merger, states, RANKS, NUM_SAMPLES, previous=previous, global_rank=global_rank
    )
    weights = weight_matrix("fedilora", states, RANKS, NUM_SAMPLES, global_rank)
    # Uncovered dimensions have zero magnitude, so the bound demands equality there.
    assert_within_bound(stream, batch, magnitude(states, weights, NUM_SAMPLES, global_rank))
    empty = stream[lora_a(QUERY)][8:]
    if empty_dim == "keep" and previous is not None:
        kept = min(previous_rank, global_rank) - 8
        assert torch.equal(empty[:kept], previous[lora_a(QUERY)][8:].to(dtype))
        assert not bool(empty[:kept].eq(0).any()) or kept == 0
        assert torch.equal(empty[kept:], torch.zeros_like(empty[kept:]))
    else:
        assert torch.equal(empty, torch.zeros_like(empty))


def test_default_global_rank_is_the_larger_of_template_and_previous() -> None:
    states = client_states()
    previous = previous_state(9)
    merger = get_merger("fedilora")
    batch = merger.merge(states, RANKS, NUM_SAMPLES, previous=previous)  # R = max(8, 9)
    stream = run_stream(merger, states, RANKS, NUM_SAMPLES, previous=previous)  # template rank 8
    assert lora_rank(stream) == lora_rank(batch) == 9
    weights = weight_matrix("fedilora", states, RANKS, NUM_SAMPLES, 9)
    assert_within_bound(stream, batch, magnitude(states, weights, NUM_SAMPLES, 9))


def zero_products(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The same state with every lora_B zero, so every ``||B A||_F`` is 0."""
    return {k: torch.zeros_like(t) if ".lora_B." in k else t for k, t in state.items()}


@pytest.mark.parametrize("zero_norm", [(0, 1, 2, 3, 4), (0, 1), (2, 4)])
def test_hetlora_zero_norm_clients_and_the_sample_weight_fallback(zero_norm) -> None:
    # All five zero: every LoRA key falls back to p_i. Zero-norm clients first: the stream's
    # fallback sum must be discarded when the first informative client arrives.
    states = [zero_products(s) if i in zero_norm else s for i, s in enumerate(client_states())]
    merger = get_merger("hetlora")
    batch = merger.merge(states, RANKS, NUM_SAMPLES, global_rank=8)
    stream = run_stream(merger, states, RANKS, NUM_SAMPLES, global_rank=8)
    weights = weight_matrix("hetlora", states, RANKS, NUM_SAMPLES, 8)
    assert_within_bound(stream, batch, magnitude(states, weights, NUM_SAMPLES, 8))
    if len(zero_norm) == len(states):
        p = torch.tensor(NUM_SAMPLES, dtype=torch.float64) / sum(NUM_SAMPLES)
        expected = sum(w * padded(lora_a(QUERY), s[lora_a(QUERY)], 8) for w, s in zip(p, states))
        torch.testing.assert_close(stream[lora_a(QUERY)].double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flora_stream_matches_batch(dtype: torch.dtype) -> None:
    states = client_states(dtype=dtype)
    merger = get_merger("flora")
    batch = merger.merge(states, RANKS, NUM_SAMPLES)
    stream = run_stream(merger, states, RANKS, NUM_SAMPLES, global_rank=3)  # ignored
    assert list(stream) == list(batch)
    assert lora_rank(stream) == sum(RANKS)
    p = torch.tensor(NUM_SAMPLES, dtype=torch.float64) / sum(NUM_SAMPLES)
    for module in MODULES:
        # B_g is the clients' B side by side: copied, so exact.
        assert torch.equal(stream[lora_b(module)], batch[lora_b(module)])
        # A_g row block i is p_i A_i: one term per element, so S = 1 in the bound.
        a = stream[lora_a(module)]
        mags = torch.cat([w * s[lora_a(module)].to(torch.float64).abs() for w, s in zip(p, states)])
        diff = (a.to(torch.float64) - batch[lora_a(module)].to(torch.float64)).abs()
        assert a.dtype == batch[lora_a(module)].dtype
        assert bool((diff <= 3 * torch.finfo(dtype).eps * mags).all())
    weights = weight_matrix("zeropad", states, RANKS, NUM_SAMPLES, 8)
    dense = magnitude(states, weights, NUM_SAMPLES, 8)
    assert_within_bound(
        {k: stream[k] for k in (HEAD_W, HEAD_B)},
        {k: batch[k] for k in (HEAD_W, HEAD_B)},
        dense,
    )


def test_mixed_dtypes_per_key_follow_the_clients() -> None:
    # float32 factors beside a float64 dense head: each key keeps the clients' dtype.
    states = [{k: t.double() if k == HEAD_W else t for k, t in s.items()} for s in client_states()]
    stream = run_stream(get_merger("zeropad"), states, RANKS, NUM_SAMPLES)
    batch = get_merger("zeropad").merge(states, RANKS, NUM_SAMPLES)
    assert stream[HEAD_W].dtype == torch.float64 and stream[HEAD_B].dtype == torch.float32
    weights = weight_matrix("zeropad", states, RANKS, NUM_SAMPLES, 8)
    assert_within_bound(stream, batch, magnitude(states, weights, NUM_SAMPLES, 8))


@pytest.mark.parametrize("name", ["zeropad", "fedilora", "hetlora"])
def test_bound_catches_a_weight_off_by_a_tenth_of_a_percent(name: str) -> None:
    assert (len(NUM_SAMPLES) + 2) * torch.finfo(torch.float32).eps < 1e-3
    states = client_states()
    merger = get_merger(name)
    batch = merger.merge(states, RANKS, NUM_SAMPLES, global_rank=8)
    wrong = [NUM_SAMPLES[0] * 1.001, *NUM_SAMPLES[1:]]
    stream = run_stream(merger, states, RANKS, wrong, global_rank=8)
    mags = magnitude(states, weight_matrix(name, states, RANKS, NUM_SAMPLES, 8), NUM_SAMPLES, 8)
    with pytest.raises(AssertionError):
        assert_within_bound(stream, batch, mags)


def test_result_can_be_taken_twice_and_the_stream_continues() -> None:
    states = client_states()
    merger = get_merger("fedilora")
    stream = merger.stream(None, 8, states[0])
    for state, rank, count in zip(states[:3], RANKS[:3], NUM_SAMPLES[:3], strict=True):
        stream.add(state, rank, count)
    first = stream.result()
    assert all(torch.equal(t, stream.result()[k]) for k, t in first.items())
    for state, rank, count in zip(states[3:], RANKS[3:], NUM_SAMPLES[3:], strict=True):
        stream.add(state, rank, count)
    full = run_stream(merger, states, RANKS, NUM_SAMPLES, global_rank=8)
    assert all(torch.equal(t, full[k]) for k, t in stream.result().items())


# -- arrival order ------------------------------------------------------------------------


def many_clients(count: int = 12) -> tuple[list[dict[str, Tensor]], list[int], list[float]]:
    rng = random.Random(5)
    ranks = [rng.choice([2, 4, 8]) for _ in range(count)]
    samples = [float(rng.randint(1, 500)) for _ in range(count)]
    states = [build_state(rank, seed=100 + i) for i, rank in enumerate(ranks)]
    return states, ranks, samples


@pytest.mark.parametrize("name", STREAMING)
def test_in_order_makes_the_result_independent_of_arrival_order(name: str) -> None:
    states, ranks, samples = many_clients()
    merger = get_merger(name)
    dropped = 3
    kept = [i for i in range(len(states)) if i != dropped]
    direct = run_stream(
        merger, [states[i] for i in kept], [ranks[i] for i in kept], [samples[i] for i in kept]
    )
    rng = random.Random(0)
    for _ in range(4):
        arrivals = list(range(len(states)))
        rng.shuffle(arrivals)
        stream = merger.stream(None, 8, states[0])
        buffer = InOrder(range(len(states)))
        for client in arrivals:
            ready = buffer.drop(client) if client == dropped else buffer.offer(client, client)
            for _, index in ready:
                stream.add(states[index], ranks[index], samples[index])
        assert buffer.pending == 0 and buffer.done
        result = stream.result()
        assert list(result) == list(direct)
        assert all(torch.equal(result[k], direct[k]) for k in direct), arrivals


def test_in_order_releases_in_ascending_order() -> None:
    buffer = InOrder([3, 1, 2])
    assert buffer.offer(2, "b") == [] and buffer.pending == 1
    assert buffer.offer(1, "a") == [(1, "a"), (2, "b")] and buffer.pending == 0
    assert not buffer.done
    assert buffer.offer(3, "c") == [(3, "c")]
    assert buffer.done


def test_in_order_drop_releases_the_run_it_blocked() -> None:
    buffer = InOrder(range(5))
    assert buffer.offer(4, "e") == [] and buffer.offer(2, "c") == [] and buffer.offer(3, "d") == []
    assert buffer.drop(0) == [] and buffer.pending == 3  # key 1 still missing
    assert buffer.drop(1) == [(2, "c"), (3, "d"), (4, "e")]
    assert buffer.pending == 0 and buffer.done
    last = InOrder([7, 8])
    assert last.offer(7, None) == [(7, None)] and last.drop(8) == [] and last.done


def test_in_order_errors() -> None:
    with pytest.raises(ValueError, match=r"repeat: \[1\]"):
        InOrder([1, 2, 1])
    buffer = InOrder([1, 2])
    with pytest.raises(ValueError, match="key 5 is not expected"):
        buffer.offer(5, "x")
    with pytest.raises(ValueError, match="key 5 is not expected"):
        buffer.drop(5)
    buffer.offer(2, "b")
    with pytest.raises(ValueError, match="key 2 was already offered"):
        buffer.offer(2, "b")
    buffer.drop(1)
    with pytest.raises(ValueError, match="key 1 was already dropped"):
        buffer.offer(1, "a")


# -- errors -------------------------------------------------------------------------------


@pytest.fixture
def stream() -> StreamingMerge:
    return get_merger("zeropad").stream(None, 8, build_state(8, seed=0))


def test_missing_and_unexpected_keys_are_named(stream: StreamingMerge) -> None:
    state = build_state(4, seed=1)
    del state[HEAD_B]
    state["extra.weight"] = torch.zeros(2)
    with pytest.raises(UpdateRejected, match=rf"missing keys \['{HEAD_B}'\].*'extra.weight'"):
        stream.add(state, 4, 10)
    assert stream.count == 0


def test_wrong_shape_is_named(stream: StreamingMerge) -> None:
    state = build_state(4, seed=1)
    state[HEAD_W] = torch.zeros(3, 7)
    with pytest.raises(UpdateRejected, match=rf"{HEAD_W}: shape \(3, 7\).*\(3, 6\)"):
        stream.add(state, 4, 10)
    state = build_state(4, seed=1)
    state[lora_b(QUERY)] = torch.zeros(6, 5)  # rank 5 beside rank-4 factors
    with pytest.raises(UpdateRejected, match=rf"{lora_b(QUERY)}: shape \(6, 5\).*\(6, 4\)"):
        stream.add(state, 4, 10)


def test_declared_rank_must_match_and_fit(stream: StreamingMerge) -> None:
    with pytest.raises(UpdateRejected, match=rf"{lora_a(QUERY)}: shape \(4, 5\).*for rank 2"):
        stream.add(build_state(4, seed=1), 2, 10)
    with pytest.raises(ValueError, match=r"rank 9 is outside \[1, 8\]"):
        stream.add(build_state(9, seed=1), 9, 10)
    with pytest.raises(ValueError, match="num_samples must be positive"):
        stream.add(build_state(4, seed=1), 4, 0)


def test_dtype_must_match_the_first_client(stream: StreamingMerge) -> None:
    stream.add(build_state(4, seed=1), 4, 10)
    with pytest.raises(UpdateRejected, match=rf"{lora_a(QUERY)}: torch.float64"):
        stream.add(build_state(4, seed=2, dtype=torch.float64), 4, 10)
    assert stream.count == 1


def test_result_with_nothing_added_raises(stream: StreamingMerge) -> None:
    with pytest.raises(ValueError, match="no client was added"):
        stream.result()


def test_flexlora_does_not_stream() -> None:
    with pytest.raises(NotImplementedError, match="'flexlora'"):
        get_merger("flexlora").stream(None, 8, build_state(8, seed=0))


def test_previous_must_fit_the_stream() -> None:
    template = build_state(8, seed=0)
    with pytest.raises(ValueError, match="rank 10 > global_rank 8"):
        get_merger("fedilora").stream(build_state(10, seed=1), 8, template)
    narrow = {k: t[:, :3] if k == lora_a(QUERY) else t for k, t in build_state(8, seed=1).items()}
    with pytest.raises(ValueError, match=rf"{lora_a(QUERY)}: previous global shape"):
        get_merger("zeropad").stream(narrow, 8, template)


def test_streams_flags() -> None:
    assert {name for name in MERGERS if merger_class(name).streams} == set(STREAMING)
    assert not get_merger("flexlora").streams


@pytest.mark.parametrize("name", ["zeropad", "fedilora"])
def test_large_tensors_are_added_in_pieces_with_the_same_result(name: str, monkeypatch) -> None:
    import aggregation.streaming as streaming

    states = client_states()
    whole = run_stream(get_merger(name), states, RANKS, NUM_SAMPLES)
    monkeypatch.setattr(streaming, "_CHUNK", 2)  # every tensor above 8 elements is split
    pieces = run_stream(get_merger(name), states, RANKS, NUM_SAMPLES)
    assert all(torch.equal(pieces[k], whole[k]) for k in whole)


def test_a_rejected_client_leaves_the_stream_unchanged() -> None:
    states = client_states()
    merger = get_merger("hetlora")
    stream = merger.stream(None, 8, states[0])
    stream.add(states[0], RANKS[0], NUM_SAMPLES[0])
    huge = {k: t * 1e30 if ".lora_" in k else t for k, t in states[1].items()}  # norm overflows
    with pytest.raises(ValueError, match="finite"):
        stream.add(huge, RANKS[1], NUM_SAMPLES[1])
    bad = dict(states[1])
    bad[HEAD_W] = torch.zeros(2, 2)
    with pytest.raises(UpdateRejected):
        stream.add(bad, RANKS[1], NUM_SAMPLES[1])
    for state, rank, count in zip(states[1:], RANKS[1:], NUM_SAMPLES[1:], strict=True):
        stream.add(state, rank, count)
    expected = run_stream(merger, states, RANKS, NUM_SAMPLES, global_rank=8)
    assert stream.count == len(states)
    assert all(torch.equal(stream.result()[k], t) for k, t in expected.items())
