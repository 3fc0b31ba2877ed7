"""The merger registry: name resolution, options, and the merge/redistribute hooks."""

import re

import pytest
import torch
from lora_builders import NUM_SAMPLES, RANKS, assert_states_equal, build_state, client_states

from aggregation import (
    MERGERS,
    DampedMerger,
    FediLoRAMerger,
    FlexLoRAMerger,
    FLoRAMerger,
    HetLoRAMerger,
    RaFLoRAMerger,
    RankMerger,
    ZeroPadMerger,
    fedilora_merge,
    get_merger,
    merger_class,
    truncate,
    zeropad_merge,
)


def test_registry_maps_names_to_classes() -> None:
    assert {name: merger_class(name) for name in MERGERS} == {
        "zeropad": ZeroPadMerger,
        "fedilora": FediLoRAMerger,
        "fedilora_damped": DampedMerger,
        "hetlora": HetLoRAMerger,
        "flexlora": FlexLoRAMerger,
        "flora": FLoRAMerger,
        "raflora": RaFLoRAMerger,
    }
    for name in MERGERS:
        cls = merger_class(name)
        assert cls.name == name
        assert issubclass(cls, RankMerger)
        assert isinstance(get_merger(name), cls)


def test_unknown_name_lists_valid_names() -> None:
    valid = "valid methods: fedilora, fedilora_damped, flexlora, flora, hetlora, raflora, zeropad"
    with pytest.raises(ValueError, match=re.escape(valid)):
        get_merger("fedavg")


def test_unknown_option_lists_valid_options() -> None:
    with pytest.raises(ValueError, match=re.escape("valid options: []")):
        get_merger("zeropad", empty_dim="keep")
    with pytest.raises(ValueError, match=re.escape("valid options: ['empty_dim']")):
        get_merger("fedilora", empty=True)


def test_fedilora_merger_validates_empty_dim() -> None:
    assert get_merger("fedilora", empty_dim="zero").empty_dim == "zero"
    with pytest.raises(ValueError, match="empty_dim must be one of"):
        FediLoRAMerger(empty_dim="nan")  # type: ignore[arg-type]


def test_mergers_match_the_functions() -> None:
    states = client_states()
    previous = build_state(10, seed=42)
    assert_states_equal(
        get_merger("zeropad").merge(states, RANKS, NUM_SAMPLES),
        zeropad_merge(states, RANKS, NUM_SAMPLES),
    )
    assert_states_equal(
        get_merger("fedilora", empty_dim="keep").merge(states, RANKS, NUM_SAMPLES, previous),
        fedilora_merge(states, RANKS, NUM_SAMPLES, previous=previous, global_rank=10),
    )


TRUNCATING = sorted(n for n in MERGERS if not merger_class(n).fresh_adapter_each_round)
FIXED_RANK = sorted(n for n in MERGERS if merger_class(n).fixed_rank)


@pytest.mark.parametrize("name", TRUNCATING)
def test_redistribute_truncates(name: str) -> None:
    global_state = build_state(8, seed=3)
    assert_states_equal(get_merger(name).redistribute(global_state, 2), truncate(global_state, 2))


@pytest.mark.parametrize("name", FIXED_RANK)
@pytest.mark.parametrize(
    ("ranks", "num_samples", "global_rank", "message"),
    [
        ([8, 8, 4, 2], NUM_SAMPLES, None, "5 states, 4 ranks and 5 sample counts"),
        (RANKS, [10, 30, 0, 5, 35], None, "client 2: num_samples must be positive"),
        (RANKS, NUM_SAMPLES, 4, "client 0: rank 8 is outside [1, 4]"),
        ([8, 8, 4, 4, 2], NUM_SAMPLES, None, "client 3: declared rank 4 but its tensors have 2"),
    ],
)
def test_merge_rejects_inconsistent_inputs(
    name: str, ranks: list, num_samples: list, global_rank: int | None, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        get_merger(name).merge(client_states(), ranks, num_samples, global_rank=global_rank)


def test_merge_rejects_no_clients() -> None:
    with pytest.raises(ValueError, match="zero clients"):
        get_merger("fedilora").merge([], [], [])


def test_subclass_plugs_in_through_combine() -> None:
    class FirstClient(RankMerger):
        name = "first"

        def _combine(self, states, ranks, num_samples, previous, global_rank):  # noqa: ANN001
            return {key: tensor.clone() for key, tensor in states[0].items()}

    merged = FirstClient().merge(client_states([2, 2]), [2, 2], [1, 1])
    assert torch.equal(next(iter(merged.values())), next(iter(client_states([2])[0].values())))
    with pytest.raises(ValueError, match="client 1: rank 4"):
        FirstClient().merge(client_states([2, 4]), [2, 4], [1, 1], global_rank=2)
