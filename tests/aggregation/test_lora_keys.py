"""Key classification, rank detection, truncation and padding of LoRA state dicts."""

import pytest
import torch
from lora_builders import CONV, HEAD_B, HEAD_W, QUERY, build_state, clone_states, lora_a, lora_b

from aggregation import (
    default_global_rank,
    is_lora_a,
    is_lora_b,
    lora_rank,
    pad,
    rank_axis,
    truncate,
)


@pytest.mark.parametrize(
    ("key", "a", "b", "axis"),
    [
        (f"{QUERY}.lora_A.weight", True, False, 0),
        (f"{QUERY}.lora_B.weight", False, True, 1),
        (f"{CONV}.lora_A.weight", True, False, 0),
        (f"{QUERY}.lora_A.default.weight", True, False, 0),  # model state_dict form
        ("lora_B.weight", False, True, 1),
        (HEAD_W, False, False, None),
        (HEAD_B, False, False, None),
        (f"{QUERY}.weight", False, False, None),
        (f"{QUERY}.lora_A.bias", False, False, None),
        ("base_model.model.my_lora_A.weight", False, False, None),
        ("base_model.model.lora_A.x.y.weight", False, False, None),
    ],
)
def test_key_classification(key: str, a: bool, b: bool, axis: int | None) -> None:
    assert is_lora_a(key) is a
    assert is_lora_b(key) is b
    assert rank_axis(key) == axis


def test_lora_rank_reads_rank_axis() -> None:
    assert lora_rank(build_state(3, seed=0)) == 3


def test_lora_rank_rejects_disagreeing_tensors() -> None:
    state = build_state(4, seed=0)
    state[lora_b(CONV)] = state[lora_b(CONV)][:, :2]
    with pytest.raises(ValueError, match="disagree") as info:
        lora_rank(state)
    assert lora_b(CONV) in str(info.value)


def test_lora_rank_rejects_dense_only_state() -> None:
    with pytest.raises(ValueError, match="no lora_A/lora_B"):
        lora_rank({HEAD_W: torch.zeros(2, 2)})


def test_truncate_slices_rank_axis_and_copies() -> None:
    state = build_state(8, seed=1)
    before = clone_states([state])[0]
    cut = truncate(state, 3)
    for module in (QUERY, CONV):
        assert torch.equal(cut[lora_a(module)], state[lora_a(module)][:3])
        assert torch.equal(cut[lora_b(module)], state[lora_b(module)][:, :3])
    assert torch.equal(cut[HEAD_W], state[HEAD_W])
    assert lora_rank(cut) == 3
    for tensor in cut.values():
        tensor.add_(1.0)  # writing to the result must not reach the input
    for key in state:
        assert torch.equal(state[key], before[key])


@pytest.mark.parametrize("rank", [0, 9])
def test_truncate_rejects_rank_out_of_range(rank: int) -> None:
    with pytest.raises(ValueError, match="cannot truncate"):
        truncate(build_state(8, seed=1), rank)


def test_pad_appends_zero_dimensions_and_truncate_undoes_it() -> None:
    state = build_state(2, seed=2)
    padded = pad(state, 5)
    assert lora_rank(padded) == 5
    assert torch.equal(padded[lora_a(CONV)][2:], torch.zeros(3, 3, 1, 1))
    assert torch.equal(padded[lora_b(QUERY)][:, 2:], torch.zeros(6, 3))
    assert torch.equal(padded[HEAD_B], state[HEAD_B])
    back = truncate(padded, 2)
    for key in state:
        assert torch.equal(back[key], state[key])


def test_pad_rejects_smaller_rank() -> None:
    with pytest.raises(ValueError, match="cannot pad"):
        pad(build_state(4, seed=0), 3)


def test_default_global_rank_takes_previous_if_larger() -> None:
    assert default_global_rank([2, 4]) == 4
    assert default_global_rank([2, 4], build_state(8, seed=0)) == 8
    assert default_global_rank([16], build_state(8, seed=0)) == 16
