"""FediLoRA layer-wise model editing (docs/algorithms.md §1.3): selection, threshold and the three
mixes."""

import math

import pytest
import torch
from lora_builders import (
    CONV,
    HEAD_W,
    MODULES,
    QUERY,
    VALUE,
    assert_states_equal,
    build_state,
    clone_states,
    lora_a,
    lora_b,
)

from aggregation import EditResult, cosine_similarity, edit_layerwise

LORA_KEYS = [name(module) for module in MODULES for name in (lora_a, lora_b)]


def _reference_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    xs = [float(v) for v in x.reshape(-1)]
    ys = [float(v) for v in y.reshape(-1)]
    dot = sum(a * b for a, b in zip(xs, ys, strict=True))
    return dot / (math.sqrt(sum(a * a for a in xs)) * math.sqrt(sum(b * b for b in ys)))


def _pair(noise: dict[str, float]) -> tuple[dict, dict]:
    """A global adapter and a local one perturbed per key by ``noise[key]`` (default 0.1)."""
    global_state = build_state(4, seed=20)
    perturbation = build_state(4, seed=21)
    local = {
        key: tensor + noise.get(key, 0.1) * perturbation[key] if key in LORA_KEYS else tensor + 1
        for key, tensor in global_state.items()
    }
    return local, global_state


def test_cosine_matches_reference_and_zero_conventions() -> None:
    x, y = torch.randn(3, 4, 1, 1), torch.randn(3, 4, 1, 1)
    assert cosine_similarity(x, y) == pytest.approx(_reference_cosine(x, y), abs=1e-12)
    assert cosine_similarity(x, 2 * x) == pytest.approx(1.0)
    assert cosine_similarity(x, -x) == pytest.approx(-1.0)
    assert cosine_similarity(torch.zeros(3), torch.zeros(3)) == 1.0
    assert cosine_similarity(torch.zeros(3), torch.ones(3)) == 0.0
    assert cosine_similarity(torch.ones(3), torch.zeros(3)) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        cosine_similarity(torch.zeros(3), torch.zeros(4))


def test_weighted_edit_picks_lowest_cosine_lora_a() -> None:
    # VALUE's lora_B is the least similar tensor overall, but only lora_A tensors are candidates.
    local, global_state = _pair({lora_a(CONV): 3.0, lora_a(QUERY): 1.0, lora_b(VALUE): 10.0})
    before = clone_states([local, global_state])
    result = edit_layerwise(local, global_state)
    assert isinstance(result, EditResult)
    assert set(result.similarities) == set(LORA_KEYS)
    for key in LORA_KEYS:
        expected = _reference_cosine(local[key], global_state[key])
        assert result.similarities[key] == pytest.approx(expected, abs=1e-9)
    assert min(result.similarities, key=result.similarities.__getitem__) == lora_b(VALUE)
    lowest_a = min((result.similarities[lora_a(m)], lora_a(m)) for m in MODULES)[1]
    assert lowest_a == lora_a(CONV)
    assert result.edited == (lora_a(CONV),)

    c = result.similarities[lora_a(CONV)]
    assert 0 < c < 0.95
    expected = (1 - c) * global_state[lora_a(CONV)].double() + c * local[lora_a(CONV)].double()
    torch.testing.assert_close(result.state[lora_a(CONV)], expected.float())
    for key in local:
        if key != lora_a(CONV):
            assert torch.equal(result.state[key], local[key]), key
    assert torch.equal(result.state[HEAD_W], local[HEAD_W])  # dense: never edited
    assert_states_equal(local, before[0])
    assert_states_equal(global_state, before[1])


def test_threshold_blocks_edit_of_similar_tensors() -> None:
    local, global_state = _pair({lora_a(CONV): 3.0})
    lowest = min(edit_layerwise(local, global_state).similarities.values())
    result = edit_layerwise(local, global_state, threshold=lowest)
    assert result.edited == ()
    assert_states_equal(result.state, local)


def test_negative_cosine_is_clamped_to_the_global_value() -> None:
    local, global_state = _pair({})
    local[lora_a(VALUE)] = -2.0 * global_state[lora_a(VALUE)]
    result = edit_layerwise(local, global_state, mode="weighted")
    assert result.similarities[lora_a(VALUE)] == pytest.approx(-1.0)
    assert result.edited == (lora_a(VALUE),)
    assert torch.equal(result.state[lora_a(VALUE)], global_state[lora_a(VALUE)])


def test_count_k_over_all_tensors() -> None:
    local, global_state = _pair({lora_b(QUERY): 5.0, lora_a(CONV): 2.0, lora_b(CONV): 1.0})
    result = edit_layerwise(local, global_state, key="all", count=3, threshold=1.0)
    ranked = sorted(LORA_KEYS, key=lambda name: result.similarities[name])
    assert result.edited == tuple(ranked[:3])
    assert set(result.edited) == {lora_b(QUERY), lora_a(CONV), lora_b(CONV)}
    for key in set(local) - set(result.edited):
        assert torch.equal(result.state[key], local[key]), key


def test_key_lora_b_only_edits_b() -> None:
    local, global_state = _pair({lora_a(CONV): 5.0, lora_b(VALUE): 2.0})
    result = edit_layerwise(local, global_state, key="lora_B")
    assert result.edited == (lora_b(VALUE),)


def test_replace_mode_takes_global_tensor() -> None:
    local, global_state = _pair({lora_a(QUERY): 3.0})
    result = edit_layerwise(local, global_state, mode="replace")
    assert result.edited == (lora_a(QUERY),)
    assert torch.equal(result.state[lora_a(QUERY)], global_state[lora_a(QUERY)])


def test_half_mode_averages_local_and_global() -> None:
    local, global_state = _pair({lora_a(QUERY): 3.0})
    result = edit_layerwise(local, global_state, mode="half")
    expected = 0.5 * global_state[lora_a(QUERY)] + 0.5 * local[lora_a(QUERY)]
    torch.testing.assert_close(result.state[lora_a(QUERY)], expected)


def test_edit_keeps_local_dtype() -> None:
    local, global_state = _pair({lora_a(QUERY): 3.0})
    local = {key: tensor.to(torch.bfloat16) for key, tensor in local.items()}
    result = edit_layerwise(local, global_state)
    assert {tensor.dtype for tensor in result.state.values()} == {torch.bfloat16}


def test_edit_result_is_frozen() -> None:
    local, global_state = _pair({})
    result = edit_layerwise(local, global_state)
    with pytest.raises(AttributeError):
        result.edited = ()  # type: ignore[misc]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"key": "lora_C"}, "key must be one of"),
        ({"mode": "blend"}, "mode must be one of"),
        ({"count": 0}, "count must be at least 1"),
    ],
)
def test_edit_rejects_bad_options(options: dict, message: str) -> None:
    local, global_state = _pair({})
    with pytest.raises(ValueError, match=message):
        edit_layerwise(local, global_state, **options)


def test_edit_rejects_mismatched_adapters() -> None:
    local, global_state = _pair({})
    missing = {key: tensor for key, tensor in global_state.items() if key != lora_b(CONV)}
    with pytest.raises(ValueError, match="LoRA keys differ") as info:
        edit_layerwise(local, missing)
    assert lora_b(CONV) in str(info.value)
    wider = dict(global_state)
    wider[lora_a(QUERY)] = torch.zeros(8, 5)
    with pytest.raises(ValueError, match=lora_a(QUERY).replace(".", r"\.")):
        edit_layerwise(local, wider)
