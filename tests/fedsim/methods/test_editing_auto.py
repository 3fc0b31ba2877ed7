"""``editing.enabled=auto`` (the default): FediLoRA's editing runs with FediLoRA's merge only.

``auto`` turns editing on only with ``aggregation.method=fedilora`` and only where it can apply,
so every other merge method runs as itself with no other flag; ``true`` and ``false`` mean what
they say, and ``true`` where editing cannot apply is still an error naming the key.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import fedsim
from fedsim.config import ConfigError, as_config, flatten, load_config, to_yaml
from fedsim.config.registry import enabled_methods
from fedsim.methods.editing import Editing, editing_on

pytestmark = pytest.mark.usefixtures("restore_threads")

MERGES = ["fedilora", "zeropad", "hetlora", "flexlora", "flora"]
DEFAULT_YAML = Path(__file__).resolve().parents[3] / "experiments" / "default.yaml"


def _edits(cfg) -> bool:
    """Whether the run's method list holds editing (what the client and the round loop use)."""
    return any(isinstance(m, Editing) for m in enabled_methods(cfg))


@pytest.mark.parametrize("method", MERGES)
def test_every_merge_method_runs_as_itself_without_another_flag(method):
    cfg = load_config(None, [f"aggregation.method={method}"])
    assert cfg.editing.enabled == "auto"
    assert editing_on(cfg) is (method == "fedilora")
    assert _edits(cfg) is (method == "fedilora")


def test_the_default_experiment_still_edits():
    cfg = load_config(None)
    assert cfg.aggregation.method == "fedilora" and editing_on(cfg)


@pytest.mark.parametrize("method", MERGES)
def test_the_cli_default_file_takes_every_merge_method(method):
    """``fedsim run aggregation.method=X`` loads experiments/default.yaml under the override."""
    cfg = load_config(DEFAULT_YAML, [f"aggregation.method={method}"])
    assert editing_on(cfg) is (method == "fedilora")


@pytest.mark.parametrize("method", MERGES)
def test_false_turns_editing_off_for_every_method(method):
    cfg = load_config(None, [f"aggregation.method={method}", "editing.enabled=false"])
    assert cfg.editing.enabled is False and not editing_on(cfg) and not _edits(cfg)


@pytest.mark.parametrize("method", ["fedilora", "zeropad", "hetlora", "flexlora"])
def test_true_turns_editing_on_for_any_method_where_it_applies(method):
    cfg = load_config(None, [f"aggregation.method={method}", "editing.enabled=true"])
    assert cfg.editing.enabled is True and editing_on(cfg) and _edits(cfg)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["aggregation.method=flora"], "editing.enabled"),
        (["sharing.policy=none"], "editing.enabled"),
        (["sharing.policy=B", "editing.key=lora_A"], "editing.key"),
        (["sharing.policy=A", "editing.key=lora_B"], "editing.key"),
    ],
)
def test_true_where_editing_cannot_apply_is_still_an_error(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["editing.enabled=true", *overrides])
    assert info.value.key == key
    if key == "editing.enabled":
        assert "set editing.enabled=auto or false" in str(info.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["sharing.policy=none"],
        ["sharing.policy=B"],  # editing.key=lora_A: the tensors B keeps private
        ["sharing.policy=A", "editing.key=lora_B"],
    ],
)
def test_auto_is_off_without_error_where_editing_cannot_apply(overrides):
    cfg = load_config(None, ["aggregation.method=fedilora", *overrides])
    assert cfg.editing.enabled == "auto" and not editing_on(cfg) and not _edits(cfg)


def test_auto_with_fedilora_edits_the_shared_part_of_a_partial_policy():
    cfg = load_config(None, ["sharing.policy=B", "editing.key=lora_B"])
    assert editing_on(cfg)


@pytest.mark.parametrize("value", ["maybe", "1", "0", "2.5", "AUTO", "[true]"])
def test_any_other_value_names_the_key_and_the_allowed_values(value):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"editing.enabled={value}"])
    assert info.value.key == "editing.enabled"
    assert "auto" in str(info.value) and "True" in str(info.value)


@pytest.mark.parametrize("value", [1, "yes", None])
def test_a_config_built_in_python_with_another_value_is_rejected(value):
    cfg = load_config(None)
    cfg.editing.enabled = value
    with pytest.raises(ConfigError) as info:
        as_config(cfg)
    assert info.value.key == "editing.enabled"
    assert "auto, true, false" in str(info.value)
    with pytest.raises(ConfigError):
        editing_on(cfg)


@pytest.mark.parametrize(("text", "value"), [("true", True), ("false", False), ("auto", "auto")])
def test_each_value_round_trips_through_yaml(tmp_path, text, value):
    cfg = load_config(None, [f"editing.enabled={text}"])
    assert cfg.editing.enabled == value and type(cfg.editing.enabled) is type(value)
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert f"enabled: {text}" in path.read_text()
    again = load_config(path)
    assert again == cfg and type(again.editing.enabled) is type(value)
    assert str(flatten(cfg)["editing.enabled"]) == {"true": "True", "false": "False"}.get(
        text, text
    )


def test_a_yaml_file_and_a_dict_take_booleans(tmp_path):
    path = tmp_path / "off.yaml"
    path.write_text("aggregation:\n  method: fedilora\nediting:\n  enabled: false\n")
    assert load_config(path).editing.enabled is False
    assert as_config({"editing": {"enabled": False}}).editing.enabled is False
    assert as_config({"editing": {"enabled": "auto"}}).editing.enabled == "auto"


@pytest.mark.slow  # a whole run (or several): CI runs it, the quick loop does not
def test_a_zeropad_run_does_not_edit_and_a_fedilora_run_does(experiment_config):
    """Two rounds (editing starts in round 2) in this process: only FediLoRA's run reports
    editing metrics; zeropad's rounds carry none."""
    from actors.executor import LocalExecutor

    build = experiment_config("fedsim-editing-auto")
    zeropad = fedsim.run(build("aggregation.method=zeropad"), executor=LocalExecutor())
    fedilora = fedsim.run(build("aggregation.method=fedilora"), executor=LocalExecutor())
    assert len(zeropad.history) == len(fedilora.history) == 3  # round 0 and rounds 1, 2
    assert not any(k.startswith("editing/") for h in zeropad.history for k in h)
    assert fedilora.history[2]["editing/edited_tensors"] >= 0
    assert "editing/similarity_mean" in fedilora.history[2]  # round 2 compared with global
    # the per-client rows: editing's columns only in FediLoRA's run
    columns = {"edited_tensors", "min_similarity"}
    assert zeropad.clients[-1] and not any(
        columns & set(r) for rows in zeropad.clients for r in rows
    )
    assert fedilora.clients[-1] and all(columns <= set(r) for r in fedilora.clients[-1])
