"""The shipped experiments: package data, named without a path, the same default everywhere.

``fedsim/experiments/*.yaml`` install with the package; ``fedsim run`` without a config runs
the shipped default from any directory, ``fedsim run vlm_emoji`` names one without a path, an
unknown name is a one-line error listing the known ones, and the checkout's
``experiments/<name>.yaml`` paths keep working. (A wheel built and installed in a fresh venv:
``tests/test_packaging.py``.)
"""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest
import yaml

from fedsim import experiments
from fedsim.cli import main
from fedsim.config import ConfigError, load_config, to_yaml
from fedsim.simulation.study import load_study

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "fedsim" / "experiments"


def test_the_shipped_experiments_and_studies_are_told_apart():
    runs, studies = experiments.names("run"), experiments.names("study")
    assert {"default", "vlm_emoji", "fedilora_llava", "fedmllm_hateful_memes"} <= set(runs)
    assert {"compare", "fedmllm_grid", "merge_study", "privacy", "robust"} <= set(studies)
    assert not set(runs) & set(studies)
    assert (
        sorted(runs + studies)
        == experiments.names()
        == sorted(p.stem for p in SHIPPED.glob("*.yaml"))
    )


@pytest.mark.parametrize("name", experiments.names("run"))
def test_every_shipped_experiment_loads_by_name_and_by_its_checkout_path(name, monkeypatch):
    monkeypatch.chdir(REPO)  # experiments/<name>.yaml: the checkout's former path still works
    assert to_yaml(load_config(name)) == to_yaml(load_config(f"experiments/{name}.yaml"))
    assert experiments.find(f"{name}.yaml") == SHIPPED / f"{name}.yaml"


@pytest.mark.parametrize("name", experiments.names("study"))
def test_every_shipped_study_loads_by_name_with_its_base(name):
    study, base = load_study(name)
    assert study.variants and base.parent == SHIPPED and not experiments.is_study(base)


def test_the_checkout_keeps_every_shipped_file_under_its_former_path():
    for path in SHIPPED.glob("*.yaml"):
        old = REPO / "experiments" / path.name
        assert old.is_file() and old.read_bytes() == path.read_bytes(), old


def test_a_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("default").write_text("rounds: 3\n")
    assert load_config("default").rounds == 3
    assert load_config("default.yaml").rounds == 10  # no such file here: the shipped one


@pytest.mark.parametrize(
    ("ref", "kind", "fragment"),
    [
        ("vlm_emoj", "run", "unknown experiment 'vlm_emoj'"),
        ("nowhere/exp.yaml", "run", "file not found: nowhere/exp.yaml"),
        ("exp.yaml", "run", "file not found: exp.yaml"),
        ("compare", "run", "compare is a study: run it with `fedsim compare compare`"),
        ("default", "study", "default is an experiment, not a study"),
        ("compar", "study", "unknown study 'compar'"),
        ("../experiments/default", "run", "file not found: ../experiments/default (or name"),
    ],
)
def test_a_bad_name_is_one_line_naming_what_exists(ref, kind, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        experiments.find(ref, kind)
    message = str(info.value)
    assert fragment in message and "\n" not in message
    if "unknown" in fragment:  # the names that do exist, of the kind asked for
        known = experiments.names(kind)
        assert message.endswith("known: " + ", ".join(known))


def test_a_directory_is_not_an_experiment(tmp_path):
    with pytest.raises(ConfigError, match="is a directory, not a YAML file"):
        load_config(tmp_path)


def test_the_command_line_names_the_known_experiments(ray_address, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["config", "vlm_emoji"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["tracking"]["experiment"] == "vlm-emoji"
    assert main(["run", "vlm_emojii", "rounds=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedsim: config error: config: unknown experiment 'vlm_emojii'")
    assert "known: default, " in err and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())  # refused before Ray, MLflow or a checkpoint


def test_no_config_means_the_shipped_default_from_any_directory(tmp_path, monkeypatch, capsys):
    # an experiments/default.yaml of the working directory is no longer picked up by itself
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "default.yaml").write_text("rounds: 99\n")
    monkeypatch.chdir(tmp_path)
    assert main(["config"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    shipped = yaml.safe_load((SHIPPED / "default.yaml").read_text())
    assert shown["tracking"]["experiment"] == shipped["tracking"]["experiment"] == "fedsim-default"
    assert shown["rounds"] == shipped["rounds"] == 10


def test_a_study_finds_its_base_next_to_it_else_by_name(tmp_path):
    study = tmp_path / "mine.yaml"
    study.write_text("base: vlm_emoji.yaml\nvariants:\n  a: []\n")
    assert load_study(study)[1] == SHIPPED / "vlm_emoji.yaml"  # not next to it: shipped
    (tmp_path / "vlm_emoji.yaml").write_text("rounds: 2\n")
    assert load_study(study)[1] == tmp_path / "vlm_emoji.yaml"  # next to it wins
    study.write_text("base: nothing.yaml\nvariants:\n  a: []\n")
    with pytest.raises(
        ConfigError, match=r"no shipped experiment is called 'nothing.yaml' \(known: default"
    ):
        load_study(study)


def test_setup_cfg_ships_the_experiments_and_the_type_markers():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    data = cfg["options.package_data"]
    assert data["fedsim.experiments"].strip() == "*.yaml"
    for package in ("fedsim", "actors", "aggregation"):
        assert "py.typed" in data[package] and (REPO / package / "py.typed").is_file()
    assert (SHIPPED / "__init__.py").is_file()  # a package, so find: packages it
    assert "Apache License" in (REPO / "LICENSE").read_text()
    assert cfg["metadata"]["license"] == "Apache-2.0"
