"""Config loading: defaults, YAML + dotlist merging, validation errors, rank distributions, CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aggregation import MERGERS
from fedsim import cli
from fedsim.config import (
    DEFAULT_TRACKING_URI,
    FEDILORA_RANKS,
    ClientsConfig,
    ConfigError,
    FedSimConfig,
    load_config,
    resolve_ranks,
    to_yaml,
)

REPO = Path(__file__).resolve().parents[3]
DEFAULT_YAML = REPO / "experiments" / "default.yaml"


def test_defaults_load_and_match_the_dataclass():
    cfg = load_config()
    expected = FedSimConfig()
    assert expected.tracking.uri is None  # unset in the dataclass: resolved on loading
    expected.tracking.uri = DEFAULT_TRACKING_URI  # (the tests run without MLFLOW_TRACKING_URI)
    assert cfg == expected
    assert cfg.clients.ranks == "32,32,16,16,8,8,4,4,4,4"  # the string spec of that list
    assert resolve_ranks(cfg.clients, cfg.seed) == list(FEDILORA_RANKS)


def test_yaml_then_dotlist_overrides_merge(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        "seed: 7\nrounds: 3\nclients:\n  num: 4\n  ranks: [4, 4, 2, 2]\n"
        "data:\n  alpha: 0.3\ntrain:\n  lr: 0.01\n"
    )
    cfg = load_config(path, ["rounds=5", "clients.fraction=0.5", "data.alpha=0.9"])
    assert cfg.seed == 7  # from the YAML
    assert cfg.clients.num == 4 and cfg.clients.ranks == "4,4,2,2"  # a YAML list, joined
    assert resolve_ranks(cfg.clients, cfg.seed) == [4, 4, 2, 2]
    assert cfg.train.lr == 0.01
    assert cfg.rounds == 5  # dotlist wins over the YAML
    assert cfg.clients.fraction == 0.5
    assert cfg.data.alpha == 0.9
    assert cfg.data.missing_rate == FedSimConfig().data.missing_rate  # untouched default


def test_default_experiment_has_the_documented_keys():
    cfg = load_config(DEFAULT_YAML)
    assert cfg.seed == 0
    assert cfg.rounds == 10
    assert cfg.clients.num == 10
    assert cfg.clients.fraction == 0.4
    assert resolve_ranks(cfg.clients, cfg.seed) == list(FEDILORA_RANKS)
    assert cfg.aggregation.method == "fedilora"
    assert cfg.data.dataset == "emoji"
    assert cfg.data.alpha == 0.5
    assert cfg.data.missing_rate == 0.4
    assert cfg.model.backbone == "minilm-effnet"
    assert cfg.resources.client.num_cpus == 1
    assert cfg.resources.client.num_gpus == 0
    assert cfg.tracking.uri.startswith("sqlite:///")
    assert cfg.tracking.experiment


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        (["foo=1"], "foo", "unknown key"),
        (["clients.colour=red"], "clients.colour", "unknown key"),
        (["data.label=emotion"], "data.label", "group"),
        (["train.precision=fp16"], "train.precision", "bf16"),
        (["lora.scaling=sqrt"], "lora.scaling", "constant"),
        (["data.missing_rate=-0.1"], "data.missing_rate", "-0.1"),
        (["data.missing_rate=1.5"], "data.missing_rate", "[0, 1]"),
        (["data.alpha=-1"], "data.alpha", "> 0"),
        (["train.lr=-0.001"], "train.lr", "> 0"),
        (["clients.fraction=0"], "clients.fraction", "(0, 1]"),
        (["clients.fraction=1.5"], "clients.fraction", "(0, 1]"),
        (["clients.fraction=-0.2"], "clients.fraction", "(0, 1]"),
        (["rounds=-1"], "rounds", ">= 0"),
        (["rounds=2.5"], "rounds", "2.5"),
        (["model.backbone=resnet"], "model.backbone", "tiny"),
        (["model.backbone=hf"], "model.text_encoder", "required"),
        (["resources.client.num_gpus=1.5"], "resources.client.num_gpus", "fraction"),
        (["clients.ranks=[8,8]"], "clients.ranks", "clients.num is 10"),
        (["clients.num=3", "clients.ranks=[8,0,4]"], "clients.ranks", "client 1"),
        (["clients.num=2", "clients.ranks=[8,-4]"], "clients.ranks", ">= 1"),
        (["clients.num=2", "clients.ranks=[8,2.5]"], "clients.ranks", "2.5"),
        (["clients.ranks=equal:0"], "clients.ranks", ">= 1"),
        (["clients.ranks=gaussian"], "clients.ranks", "equal:R"),
        (["clients.ranks=equal:x"], "clients.ranks", "choice:R1,R2"),
        (["clients.ranks=choice:4,x"], "clients.ranks", "fedilora"),
        (
            ["clients.num=4", "clients.ranks=equal:4", "faults.nan_update_clients=[4]"],
            "faults.nan_update_clients",
            "client id 4",
        ),
        (["data.subset=5"], "data.subset", "2 * clients.num"),
        (
            ["tracking.system_metrics_interval_s=0"],
            "tracking.system_metrics_interval_s",
            "at least 0.1",
        ),
    ],
)
def test_bad_values_raise_config_error_naming_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert info.value.key == key
    message = str(info.value)
    assert key in message
    assert fragment in message
    assert "\n" not in message


def test_unknown_aggregation_method_lists_the_allowed_ones():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["aggregation.method=fedavgg"])
    assert info.value.key == "aggregation.method"
    message = str(info.value)
    assert "fedavgg" in message
    for name in MERGERS:
        assert name in message


def test_bad_key_in_yaml_file_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("clients:\n  num: 4\n  fractoin: 0.5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "clients.fractoin"


def test_missing_file_and_malformed_override_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["rounds"])


@pytest.mark.parametrize("spec", ["choice:", "{a: 1}"])
def test_rank_spec_parsed_as_a_mapping_raises_config_error(spec):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"clients.ranks={spec}"])
    assert info.value.key == "clients.ranks"


@pytest.mark.parametrize("value", ["-1", "-2"])
def test_negative_gpu_count_raises_config_error(value):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"resources.client.num_gpus={value}"])
    assert info.value.key == "resources.client.num_gpus"


def _ranks(spec, num: int = 10, seed: int = 0) -> list[int]:
    return resolve_ranks(ClientsConfig(num=num, ranks=spec), seed)


def test_named_rank_distributions():
    assert _ranks("fedilora", 10) == list(FEDILORA_RANKS)
    assert _ranks("fedilora", 25) == [FEDILORA_RANKS[i % 10] for i in range(25)]
    assert _ranks("equal:8", 5) == [8] * 5
    assert _ranks(16, 3) == [16] * 3
    drawn = _ranks("choice:4,8", 200, seed=3)
    assert set(drawn) == {4, 8}


def test_choice_distribution_is_seeded():
    assert _ranks("choice:4,8", 50, seed=1) == _ranks("choice:4,8", 50, seed=1)
    assert _ranks("choice:4,8", 50, seed=1) != _ranks("choice:4,8", 50, seed=2)


def test_named_distribution_through_load_config():
    cfg = load_config(None, ["clients.num=6", "clients.ranks=choice:4,8", "seed=5"])
    ranks = resolve_ranks(cfg.clients, cfg.seed)
    assert len(ranks) == 6 and set(ranks) <= {4, 8}
    cfg = load_config(None, ["clients.num=3", "clients.ranks=equal:8"])
    assert resolve_ranks(cfg.clients, cfg.seed) == [8, 8, 8]


def test_cli_bad_value_exits_2_with_one_line_naming_the_key(ray_address, capsys):
    assert cli.main(["run", "clients.fraction=2"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert "clients.fraction" in lines[0]
    assert captured.out == ""


def _fedsim_command() -> list[str]:
    script = Path(sys.executable).parent / "fedsim"
    if script.is_file():
        return [str(script)]
    found = shutil.which("fedsim")
    return [found] if found else [sys.executable, "-m", "fedsim.cli"]


@pytest.mark.slow  # a fresh Python process
def test_console_script_bad_key_exits_2_with_one_line(ray_address, tmp_path):
    # `fedsim run` starts Ray before it reads the config: it joins the session's cluster rather
    # than starting one of its own (tests/fedsim/test_streaming_engine.py starts its own)
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    proc = subprocess.run(
        [*_fedsim_command(), "run", "clients.nmu=3"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "clients.nmu" in lines[0]


def test_config_command_prints_yaml_that_round_trips(capsys, tmp_path):
    overrides = ["rounds=3", "clients.num=4", "clients.ranks=[8,4,4,2]", "data.subset=100"]
    assert cli.main(["config", str(DEFAULT_YAML), *overrides]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    expected = load_config(DEFAULT_YAML, overrides)
    assert load_config(path) == expected
    assert to_yaml(expected) == text
