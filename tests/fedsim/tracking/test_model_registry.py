"""``tracking.register_model``: the final global adapter as an MLflow Model Registry version.

Real tiny runs (in-process, no Ray) log to a real SQLite store; the registered versions are
linked to their runs and load back with peft onto the backbone the runs trained.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

import fedsim
from fedsim.config import ConfigError
from fedsim.models.backbone import build_backbone
from fedsim.tracking.model_registry import (
    MODEL_DESCRIPTION,
    RegistryError,
    load_registered_adapter,
    load_registered_peft_model,
)
from fedsim.tracking.tracker import run_tags

pytestmark = pytest.mark.usefixtures("restore_threads")

EXPERIMENT = "fedsim-registry"
NAME = "fedsim-test"
NUM_CLASSES = 9  # the emoji groups of the tiny config
# peft looks for the base model's config under base_model_name_or_path ("tiny"): harmless.
NO_HUB_CONFIG = pytest.mark.filterwarnings("ignore:Could not find a config file:UserWarning")


@pytest.fixture(scope="module")
def build(experiment_config):
    return experiment_config(EXPERIMENT)


def _run(cfg):
    from actors.executor import LocalExecutor

    return fedsim.run(cfg, executor=LocalExecutor())


@pytest.fixture(scope="module")
def runs(build):
    """Two registering runs of different seeds: versions 1 and 2 of ``NAME``."""
    configs = [
        build(f"tracking.register_model={NAME}", "tracking.plots=false", f"seed={seed}")
        for seed in (0, 1)
    ]
    return [(cfg, _run(cfg)) for cfg in configs]


@pytest.fixture(scope="module")
def client(runs) -> MlflowClient:
    uri = runs[0][0].tracking.uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _run_adapter(client, run_id: str, dst: Path) -> dict[str, torch.Tensor]:
    path = client.download_artifacts(run_id, "global_adapter", str(dst))
    return load_file(f"{path}/adapter_model.safetensors")


def test_each_run_registers_a_new_version_linked_to_it(runs, client):
    model = client.get_registered_model(NAME)
    assert model.description == MODEL_DESCRIPTION
    assert "fedsim global LoRA adapter" in model.description
    for number, (cfg, result) in enumerate(runs, start=1):
        version = client.get_model_version(NAME, str(number))
        assert version.status == "READY"
        assert version.run_id == result.run_id
        assert version.source.endswith(f"/registered_adapter/round_{cfg.rounds:04d}")
        assert result.run_id in version.source
        assert result.run_id in version.description
        assert version.tags["fedsim.merge"] == cfg.aggregation.method
        assert version.tags["fedsim.method"] == run_tags(cfg)["fedsim.method"]
        assert version.tags["fedsim.ranks"] == cfg.clients.ranks == "8,8,4,4,2,2"
        assert version.tags["fedsim.global_rank"] == "8"
        assert version.tags["fedsim.backbone"] == "tiny"
        assert version.tags["fedsim.seed"] == str(cfg.seed)
        assert version.tags["fedsim.base_delta"] == "false"
        assert "fedsim.base_model" not in version.tags  # the tiny backbone has no hub id
        run = client.get_run(result.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["fedsim.registered_model"] == f"{NAME}/{number}"
    assert sorted(int(v.version) for v in client.search_model_versions(f"name='{NAME}'")) == [1, 2]


def test_the_models_uri_resolves_to_the_adapter_files(runs, client, tmp_path, monkeypatch):
    """MLflow 3.17 resolves ``models:/`` through the current registry URI (not the
    tracking_uri argument), so the store is set as the current one here."""
    uri = runs[0][0].tracking.uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{NAME}/1", dst_path=str(tmp_path), tracking_uri=uri
        )
    )
    assert {p.name for p in local.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    expected = _run_adapter(client, runs[0][1].run_id, tmp_path / "run")
    saved = load_file(str(local / "adapter_model.safetensors"))
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[k], expected[k]) for k in saved)


@NO_HUB_CONFIG
def test_a_registered_version_loads_with_peft_onto_the_runs_backbone(runs, client, tmp_path):
    cfg, result = runs[0]
    path = load_registered_adapter(NAME, 1, cfg.tracking.uri, tmp_path / "v1")
    assert path.is_dir() and (path / "adapter_config.json").is_file()
    assert path.is_relative_to(tmp_path)  # a copy, never the store's own files
    expected = _run_adapter(client, result.run_id, tmp_path / "run")
    assert any("lora_A" in k for k in expected)

    model = PeftModel.from_pretrained(build_backbone(cfg.model, NUM_CLASSES, cfg.seed).model, path)
    loaded = get_peft_model_state_dict(model)
    assert set(loaded) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key


@NO_HUB_CONFIG
def test_the_latest_version_an_alias_and_the_peft_model_shortcut(runs, client, tmp_path):
    (cfg0, first), (cfg1, second) = runs
    latest = load_registered_adapter(NAME, tracking_uri=cfg1.tracking.uri, dst=tmp_path / "l")
    expected = _run_adapter(client, second.run_id, tmp_path / "run2")
    assert load_file(str(latest / "adapter_model.safetensors")).keys() == expected.keys()
    latest_tensors = load_file(str(latest / "adapter_model.safetensors"))
    assert all(torch.equal(latest_tensors[k], expected[k]) for k in expected)

    client.set_registered_model_alias(NAME, "champion", "1")
    base = build_backbone(cfg0.model, NUM_CLASSES, cfg0.seed).model
    model = load_registered_peft_model(base, NAME, "champion", cfg0.tracking.uri)
    assert isinstance(model, PeftModel)
    loaded = get_peft_model_state_dict(model)
    first_tensors = _run_adapter(client, first.run_id, tmp_path / "run1")
    assert all(torch.equal(loaded[k], first_tensors[k]) for k in first_tensors)
    # the two runs (seeds 0 and 1) trained different adapters
    assert any(not torch.equal(first_tensors[k], expected[k]) for k in expected)
    # version numbers given as text name versions, not aliases
    same = load_registered_adapter(NAME, "1", cfg0.tracking.uri, tmp_path / "text")
    assert load_file(str(same / "adapter_model.safetensors")).keys() == first_tensors.keys()


def test_register_model_needs_the_adapter_logged(make_config):
    with pytest.raises(ConfigError, match="tracking.register_model") as info:
        make_config(f"tracking.register_model={NAME}", "tracking.save_adapter=false")
    assert info.value.key == "tracking.register_model"
    assert "tracking.save_adapter" in str(info.value)


@pytest.mark.parametrize("name", ["a/b", "team:adapter", "../up", "./here", "x" * 257, "' '"])
def test_a_name_mlflow_rejects_is_a_config_error(make_config, name):
    with pytest.raises(ConfigError, match="tracking.register_model") as info:
        make_config(f"tracking.register_model={name}")
    assert info.value.key == "tracking.register_model"


def test_names_mlflow_takes_pass(make_config):
    for name in ("fedsim-test", "team.adapters_v2", "LoRA global (emoji)"):
        assert make_config(f"tracking.register_model={name}").tracking.register_model == name


def test_a_refused_registration_keeps_the_run(build, capsys):
    """The name is taken by an MLflow prompt, which the store finds only at registration: the
    run finishes with its metrics and adapter, tagged with the reason, and a warning says how
    to register it later."""
    cfg = build("tracking.register_model=fedsim-prompt", "tracking.plots=false", "rounds=1")
    client = MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    client.register_prompt("fedsim-prompt", "Describe {{image}}")
    result = _run(cfg)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert "global/accuracy" in run.data.metrics
    assert [a.path for a in client.list_artifacts(result.run_id, "global_adapter")]
    assert "prompt" in run.data.tags["fedsim.registry_error"]
    err = capsys.readouterr().err
    assert "tracking.register_model=fedsim-prompt failed" in err
    assert f"register_run({result.run_id!r}" in err


def test_extending_a_registered_run_keeps_the_earlier_versions_files(build, tmp_path):
    """A finished run extended with --resume rewrites global_adapter and registers a new
    version; the version registered first still loads the adapter of its own final round."""
    cfg = build(
        "tracking.register_model=fedsim-extended",
        "tracking.plots=false",
        "rounds=1",
        f"checkpoint.dir={tmp_path / 'runs'}",
    )
    first = _run(cfg)
    client = MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    before = _run_adapter(client, first.run_id, tmp_path / "before")
    from actors.executor import LocalExecutor

    fedsim.resume(first.run_dir, ["rounds=2"], executor=LocalExecutor())
    after = _run_adapter(client, first.run_id, tmp_path / "after")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # round 2 trained on
    v1 = load_file(
        str(
            load_registered_adapter("fedsim-extended", 1, cfg.tracking.uri)
            / "adapter_model.safetensors"
        )
    )
    v2 = load_file(
        str(
            load_registered_adapter("fedsim-extended", 2, cfg.tracking.uri)
            / "adapter_model.safetensors"
        )
    )
    assert v1.keys() == before.keys() and all(torch.equal(v1[k], before[k]) for k in before)
    assert all(torch.equal(v2[k], after[k]) for k in after)
    assert client.get_model_version("fedsim-extended", "2").run_id == first.run_id


def test_a_missing_model_version_alias_or_store_is_named(runs, tmp_path):
    uri = runs[0][0].tracking.uri
    with pytest.raises(RegistryError, match="no registered model 'nope'") as info:
        load_registered_adapter("nope", tracking_uri=uri)
    assert uri in str(info.value)
    with pytest.raises(RegistryError, match=f"'{NAME}' has no version 99") as info:
        load_registered_adapter(NAME, 99, uri)
    assert uri in str(info.value)
    with pytest.raises(RegistryError, match=f"'{NAME}' has no alias staging"):
        load_registered_adapter(NAME, "staging", uri)
    missing = tmp_path / "elsewhere.db"
    with pytest.raises(RegistryError, match="no MLflow store at"):
        load_registered_adapter(NAME, tracking_uri=f"sqlite:///{missing}")
    assert not missing.exists()  # looking did not create an empty store


@NO_HUB_CONFIG
def test_base_weight_updates_are_added_before_the_adapter_loads(build):
    """FedEx-LoRA folds its residuals into the base weights: the registered version carries
    base_delta.safetensors, which the peft-model shortcut adds to the base model's weights."""
    cfg = build(
        "tracking.register_model=fedsim-fedex",
        "tracking.plots=false",
        "fedex.enabled=true",
        "aggregation.method=zeropad",
        "editing.enabled=false",
    )
    result = _run(cfg)
    client = MlflowClient(tracking_uri=cfg.tracking.uri, registry_uri=cfg.tracking.uri)
    version = client.get_model_version("fedsim-fedex", "1")
    assert version.run_id == result.run_id
    assert version.tags["fedsim.base_delta"] == "true"
    path = load_registered_adapter("fedsim-fedex", 1, cfg.tracking.uri)
    delta = load_file(str(path / "base_delta.safetensors"))
    assert delta and any(d.abs().sum() > 0 for d in delta.values())

    pretrained = dict(build_backbone(cfg.model, NUM_CLASSES, cfg.seed).model.named_modules())
    base = build_backbone(cfg.model, NUM_CLASSES, cfg.seed).model
    model = load_registered_peft_model(base, "fedsim-fedex", tracking_uri=cfg.tracking.uri)
    modules = dict(model.named_modules())
    for prefix, d in delta.items():
        name = prefix.removesuffix(".").removeprefix("base_model.model.")
        weight = modules[f"base_model.model.{name}"].base_layer.weight
        assert torch.allclose(weight, pretrained[name].weight + d), name
