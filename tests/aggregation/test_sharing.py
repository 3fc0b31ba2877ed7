"""Sharing policies (docs/algorithms.md §2): which keys are uploaded, and split/join round trips."""

import re

import pytest
import torch
from lora_builders import DENSE, MODULES, build_state, lora_a, lora_b

from aggregation import SHARING_POLICIES, join_state, shared_keys, split_state

A_KEYS = [lora_a(module) for module in MODULES]
B_KEYS = [lora_b(module) for module in MODULES]
DENSE_KEYS = list(DENSE)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("all", A_KEYS + B_KEYS + DENSE_KEYS),
        ("B", B_KEYS + DENSE_KEYS),
        ("A", A_KEYS + DENSE_KEYS),
        ("none", []),
    ],
)
def test_policy_contents(policy: str, expected: list[str]) -> None:
    state = build_state(4, seed=0)
    assert sorted(shared_keys(state, policy)) == sorted(expected)
    shared, private = split_state(state, policy)
    assert sorted(shared) == sorted(expected)
    assert sorted(private) == sorted(set(state) - set(expected))


def test_policies_tuple() -> None:
    assert SHARING_POLICIES == ("all", "B", "A", "none")


@pytest.mark.parametrize("policy", SHARING_POLICIES)
def test_split_join_round_trip(policy: str) -> None:
    state = build_state(4, seed=1)
    shared, private = split_state(state, policy)
    joined = join_state(shared, private)
    assert set(joined) == set(state)
    for key in state:
        assert torch.equal(joined[key], state[key])
    for part in (shared, private, joined):
        for tensor in part.values():
            tensor.zero_()
    assert not torch.equal(state[A_KEYS[0]], torch.zeros_like(state[A_KEYS[0]]))


def test_shared_keys_keep_order() -> None:
    keys = list(build_state(2, seed=0))
    assert shared_keys(keys, "all") == keys


def test_join_rejects_overlap() -> None:
    state = build_state(2, seed=0)
    with pytest.raises(ValueError, match="keys both shared and private"):
        join_state(state, {A_KEYS[0]: state[A_KEYS[0]]})


def test_unknown_policy_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match=re.escape("valid policies: all, B, A, none")):
        shared_keys(["x"], "b")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown sharing policy"):
        split_state(build_state(2, seed=0), "some")  # type: ignore[arg-type]
