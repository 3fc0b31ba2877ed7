"""``fedsim.config.keys``: every schema key, with the type, default, choices and help the
schema gives it (what ``fedsim config --keys`` and the docs' config reference show)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from aggregation.registry import MERGERS, SERVER_OPTIMIZERS, SHARING_POLICIES
from fedsim.config import FedSimConfig, flatten, load_config
from fedsim.config.keys import NAME, config_keys, format_keys
from fedsim.config.registry import BACKBONES, DATASETS, OBJECTIVES

KEYS = config_keys()
BY_KEY = {k.key: k for k in KEYS}


def test_every_leaf_of_the_default_config_is_a_key_and_nothing_else():
    leaves = set(flatten(FedSimConfig()))
    listed = {k.key for k in KEYS if NAME not in k.key}
    assert listed == leaves
    assert len(KEYS) == len(BY_KEY)  # no key twice
    # a device profile's fields are keys under a name of the user's choice
    assert {"devices.profiles", f"devices.profiles.{NAME}.speed"} <= set(BY_KEY)


def test_every_key_has_a_type_a_default_and_help():
    for k in KEYS:
        assert k.type and k.default and len(k.help) > 10, k
    # the keys no page named before the reference was generated
    for key in (
        "lora.dropout",
        "tracking.save_adapter",
        "model.head_hidden",
        "model.head_dropout",
        "data.max_text_tokens",
        "tracking.parent_run_id",
        "tracking.plots",
        "data.text_placeholder",
    ):
        assert key in BY_KEY


@pytest.mark.parametrize(
    ("key", "registry"),
    [
        ("aggregation.method", MERGERS),
        ("server.optimizer", SERVER_OPTIMIZERS),
        ("sharing.policy", SHARING_POLICIES),
        ("objective.method", OBJECTIVES),
        ("data.dataset", DATASETS),
        ("model.backbone", BACKBONES),
    ],
)
def test_a_registry_name_lists_the_registered_ones(key, registry):
    assert BY_KEY[key].choices == tuple(registry)
    assert BY_KEY[key].type == "str"


def test_a_literal_lists_its_values_with_their_type():
    assert BY_KEY["data.scenario"].choices == ("aligned", "missing", "fedilora", "cross", "hybrid")
    assert BY_KEY["editing.enabled"].choices == ("auto", "true", "false")
    assert BY_KEY["editing.enabled"].type == "str | bool"
    assert BY_KEY["data.root"].type == "str | None" and BY_KEY["data.root"].default == "null"
    assert BY_KEY["model.targets"].type == "list[str]"
    assert BY_KEY["model.targets"].default == "[q_proj, v_proj]"
    assert BY_KEY["data.cross_ratio"].default == "'3:7'"  # plain 3:7 is a YAML 1.1 integer
    assert not BY_KEY["data.alpha"].choices


def _merged(dotlist: list[str]) -> FedSimConfig:
    """The typed schema with ``dotlist`` merged, as the override parser reads it (the
    combination rules, tested where they live, are not run)."""
    base = OmegaConf.structured(FedSimConfig)
    return OmegaConf.to_object(OmegaConf.merge(base, OmegaConf.from_dotlist(dotlist)))


def test_each_documented_default_given_as_an_override_is_the_default():
    overrides = [
        f"{k.key}={k.default}" for k in KEYS if NAME not in k.key and k.key != "devices.profiles"
    ]
    typed = flatten(_merged([]))
    assert flatten(_merged(overrides)) == typed
    loaded = flatten(load_config())  # the loader resolves an unset store, nothing else
    assert {k for k in typed if typed[k] != loaded[k]} == {"tracking.uri"}


def test_every_choice_passes_the_schema_types():
    with_choices = [k for k in KEYS if k.choices]
    for i in range(max(len(k.choices) for k in with_choices)):  # one merge per column
        picked = {k.key: k.choices[i % len(k.choices)] for k in with_choices}
        values = flatten(_merged([f"{key}={v}" for key, v in picked.items()]))
        for key, choice in picked.items():
            assert str(values[key]).lower() == choice.lower(), (key, choice, values[key])


def test_a_prefix_keeps_the_keys_that_start_with_it():
    assert [k.key for k in config_keys("fedex")] == ["fedex.enabled"]
    assert {k.key for k in config_keys("data.s")} == {"data.scenario", "data.subset"}
    assert config_keys("no_such_section") == []


def test_format_keys_shows_type_default_choices_and_help():
    text = format_keys(config_keys("aggregation.method"))
    first, *rest = text.splitlines()
    assert first == "aggregation.method: str = fedilora"
    assert rest[0].strip().startswith("one of: zeropad, fedilora")
    assert "Heterogeneous-rank merge" in " ".join(rest)
    assert all(len(line) <= 100 for line in format_keys(KEYS).splitlines())
