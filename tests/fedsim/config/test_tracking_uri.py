"""The MLflow store: an override > the config file > MLFLOW_TRACKING_URI > sqlite:///mlflow.db.

One function (:func:`fedsim.config.tracking_uri`) decides it for ``fedsim run``, the studies,
``fedsim inspect`` and the model registry helpers alike.
"""

from __future__ import annotations

import yaml

from fedsim.cli import main
from fedsim.config import DEFAULT_TRACKING_URI, FedSimConfig, as_config, load_config, tracking_uri

ENV = "sqlite:////tmp/fedsim-env-store/mlflow.db"


def test_the_rule_itself():
    assert tracking_uri(None, {}) == DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    assert tracking_uri(None, {"MLFLOW_TRACKING_URI": ENV}) == ENV
    assert tracking_uri("", {"MLFLOW_TRACKING_URI": ""}) == DEFAULT_TRACKING_URI  # empty: unset
    assert tracking_uri("http://srv:5000", {"MLFLOW_TRACKING_URI": ENV}) == "http://srv:5000"


def test_precedence_override_file_environment_default(tmp_path, monkeypatch):
    exp = tmp_path / "exp.yaml"
    exp.write_text("tracking:\n  uri: sqlite:///from-file.db\n")
    bare = tmp_path / "bare.yaml"
    bare.write_text("rounds: 2\n")
    assert load_config(bare).tracking.uri == DEFAULT_TRACKING_URI
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ENV)
    assert load_config(bare).tracking.uri == ENV  # the environment over the default
    assert load_config("default").tracking.uri == ENV  # the shipped default sets no store
    assert load_config(exp).tracking.uri == "sqlite:///from-file.db"  # the file over the env
    over = load_config(exp, ["tracking.uri=sqlite:///override.db"])
    assert over.tracking.uri == "sqlite:///override.db"  # the override over the file
    assert as_config({"rounds": 1}).tracking.uri == ENV


def test_a_config_object_is_resolved_on_a_copy(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ENV)
    mine = FedSimConfig()
    assert as_config(mine).tracking.uri == ENV
    assert mine.tracking.uri is None  # the caller's object is left as it was


def test_fedsim_config_shows_the_store_a_run_would_use(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ENV)
    assert main(["config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["tracking"]["uri"] == ENV
    # the resolved YAML loads back to the same store, whatever the environment says then
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert main(["config", "tracking.uri=sqlite:///x.db"]) == 0
    shown = capsys.readouterr().out
    (tmp_path / "shown.yaml").write_text(shown)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ENV)
    assert load_config(tmp_path / "shown.yaml").tracking.uri == "sqlite:///x.db"


def test_inspect_uses_the_same_rule(monkeypatch, capsys, tmp_path):
    missing = tmp_path / "nowhere" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{missing}")
    assert main(["inspect", "somerun"]) == 2
    assert f"no MLflow store at {missing}" in capsys.readouterr().err
