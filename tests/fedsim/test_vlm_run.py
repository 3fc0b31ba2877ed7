"""Generative VLMs end to end with a real SQLite MLflow store, on a real local Ray and in-process.

Tiny random-initialised LLaVA, Idefics3 and PaliGemma (built in the test, with their
processors, by ``tests/vlm_builders.py``) fine-tuned with heterogeneous LoRA ranks for two
rounds on the emoji captioning task; then the engine's other capabilities (every merge,
sharing, server optimisers, client objectives, pruning, faults, resume) on the tiny LLaVA.

The LLaVA run is on Ray (two actors, and its one-actor twin); the other families and the
capability runs are in this process (``LocalExecutor``: the same numbers as Ray's).
"""

from __future__ import annotations

import json

import pytest
import torch
from mlflow.tracking import MlflowClient
from vlm_builders import FAMILIES, build_tiny_vlm

import fedsim
from actors.executor import LocalExecutor
from fedsim.config import ConfigError, load_config

EXPERIMENT = "fedsim-vlm"
GENERATION_METRICS = ("bleu", "rouge_l", "cider", "exact_match", "loss")


@pytest.fixture(scope="session")
def tiny_vlms(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny-vlms")
    return {f: str(build_tiny_vlm(f, root / f)) for f in FAMILIES}


@pytest.fixture(scope="module")
def vlm_config(make_config, mlflow_store, tiny_vlms):
    def build(family: str = "llava", *overrides: str):
        return make_config(
            "model.backbone=hf-vlm",
            f"model.name_or_path={tiny_vlms[family]}",
            "train.batch_size=8",
            "train.eval_batch_size=8",
            "train.lr=0.01",
            "eval.max_samples=8",
            "eval.max_new_tokens=4",
            "eval.examples=3",
            f"tracking.uri={mlflow_store(EXPERIMENT)}",
            f"tracking.experiment={EXPERIMENT}",
            *overrides,
        )

    return build


ON_RAY = "llava"  # the family that runs on Ray actors; the others run in this process


@pytest.fixture(scope="module")
def family_runs(warm_ray, vlm_config, restore_threads):
    return {
        f: fedsim.run(
            vlm_config(f, f"tracking.run_name={f}", "tracking.save_client_adapters=true"),
            executor=warm_ray if f == ON_RAY else LocalExecutor(),
        )
        for f in FAMILIES
    }


@pytest.mark.slow  # reads the three family runs (one on Ray)
@pytest.mark.parametrize("family", FAMILIES)
def test_two_rounds_log_generation_metrics(family_runs, family):
    result = family_runs[family]
    assert [h["round"] for h in result.history] == [0, 1, 2]
    for h in result.history:
        for metric in GENERATION_METRICS:
            assert 0.0 <= h[f"global/{metric}"] < float("inf")
    for h in result.history[1:]:
        assert h["clients/sampled"] == 3 and h["clients/failed"] == 0
        assert "personalized/rouge_l_mean" in h and "personalized/bleu_std" in h
        assert h["train/loss_mean"] > 0
    ranks = {row["rank"] for rows in result.clients for row in rows}
    assert len(ranks) > 1  # heterogeneous ranks took part
    # the teacher-forced loss of the references falls as the adapters train (lr 0.01)
    assert result.history[-1]["global/loss"] < result.history[0]["global/loss"]


@pytest.mark.slow  # reads the three family runs (one on Ray)
def test_a_generative_run_records_its_data_with_the_targets(family_runs, mlflow_store):
    """The datasets of a caption run: the schema has the reference captions (``target``) and
    the digest covers them; the client table and heat map are there."""
    import json

    client = MlflowClient(tracking_uri=mlflow_store(EXPERIMENT))
    run = client.get_run(family_runs["llava"].run_id)
    inputs = {i.dataset.name: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"emoji-train", "emoji-test"}
    columns = [c["name"] for c in json.loads(inputs["emoji-test"].schema)["mlflow_colspec"]]
    assert columns == ["image", "text", "label", "target"]
    files = {a.path for a in client.list_artifacts(run.info.run_id, "data")}
    assert "data/clients.json" in files  # and no heat map: the tiny test config draws no plots
    assert "data/partition.png" not in files


@pytest.mark.slow  # reads the three family runs (one on Ray)
def test_example_generations_are_logged_every_evaluated_round(family_runs, mlflow_store):
    client = MlflowClient(tracking_uri=mlflow_store(EXPERIMENT))
    run_id = family_runs["llava"].run_id
    names = {a.path for a in client.list_artifacts(run_id, "examples")}
    assert names == {f"examples/round_{t:04d}.json" for t in range(3)}
    local = client.download_artifacts(run_id, "examples/round_0002.json")
    table = json.loads(open(local).read())
    assert table["columns"] == ["image", "prompt", "reference", "output", "rouge_l"]
    assert len(table["data"]) == 3
    image, prompt, reference, _, _ = table["data"][0]
    assert image.startswith("U+") and "What is the name of this emoji?" in prompt and reference


@pytest.mark.slow  # reads the three family runs (one on Ray)
def test_global_adapter_loads_with_peft_and_generates(family_runs, mlflow_store, tiny_vlms):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    client = MlflowClient(tracking_uri=mlflow_store(EXPERIMENT))
    local = client.download_artifacts(family_runs["llava"].run_id, "global_adapter")
    base = AutoModelForImageTextToText.from_pretrained(tiny_vlms["llava"])
    model = PeftModel.from_pretrained(base, local)
    saved = load_file(f"{local}/adapter_model.safetensors")
    loaded = get_peft_model_state_dict(model)
    assert set(saved) == set(loaded)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert next(iter(saved.values())).shape[0] == 8  # the global rank, max of 8, 8, 4, 4, 2, 2
    processor = AutoProcessor.from_pretrained(tiny_vlms["llava"])
    from PIL import Image

    enc = processor.apply_chat_template(
        [
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": Image.new("RGB", (64, 64), "red")},
                        {"type": "text", "text": "What is the name of this emoji?"},
                    ],
                }
            ]
        ],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]


@pytest.mark.slow  # reads the three family runs (one on Ray)
def test_client_adapters_are_logged_and_load(family_runs, mlflow_store, tiny_vlms):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    result = family_runs["idefics3"]
    trained = {row["client_id"]: row["rank"] for rows in result.clients for row in rows}
    client = MlflowClient(tracking_uri=mlflow_store(EXPERIMENT))
    logged = {a.path for a in client.list_artifacts(result.run_id, "clients") if a.is_dir}
    assert logged == {f"clients/c{c:06d}" for c in trained}
    cid = max(trained, key=trained.get)
    local = client.download_artifacts(result.run_id, f"clients/c{cid:06d}")
    base = AutoModelForImageTextToText.from_pretrained(tiny_vlms["idefics3"])
    model = PeftModel.from_pretrained(base, local)
    saved = load_file(f"{local}/adapter_model.safetensors")
    assert next(iter(saved.values())).shape[0] == trained[cid]  # the client's own rank
    loaded = get_peft_model_state_dict(model)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


@pytest.mark.slow  # reads the three family runs (one on Ray)
def test_the_same_run_on_one_actor_gives_the_same_numbers(warm_ray, vlm_config, family_runs):
    one = fedsim.run(
        vlm_config("llava", "resources.actors=1", "tracking.run_name=llava-one"),
        executor=warm_ray,
    )
    assert [_numbers(h) for h in one.history] == [_numbers(h) for h in family_runs["llava"].history]


def _numbers(h: dict) -> dict:
    """A round's metrics without the wall-clock ones."""
    return {k: v for k, v in h.items() if not k.startswith("time/")}


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        [
            "aggregation.method=zeropad",
            "editing.enabled=false",
            "objective.method=scaffold",
            "train.optimizer=sgd",
            "faults.fail_prob=0.3",
            "resources.max_retries=3",
            "data.image_fill=mask",
            "data.target=label",
            "eval.max_new_tokens=3",
        ],
        [
            "aggregation.method=hetlora",
            "editing.enabled=false",
            "pruning.gamma=0.1",
            "objective.method=fedmllm",
            "objective.layer_skip=0",
            "data.scenario=cross",
            "data.prompt_style=agnostic",
            "eval.every=2",
        ],
        [
            "aggregation.method=flexlora",
            "editing.enabled=false",
            "data.scenario=hybrid",
            "data.text_fill=mask",
        ],
        ["aggregation.method=flora", "editing.enabled=false"],
        # the 2026 merges on a generative model, under a modality scenario
        ["aggregation.method=raflora", "editing.enabled=false", "data.scenario=cross"],
        ["fedplora.enabled=true", "editing.enabled=false", "data.image_fill=mask"],
        [
            "sharing.policy=B",
            "server.optimizer=fedadam",
            "objective.method=fedprox",
            "editing.key=lora_B",
        ],
    ],
    # the first override's value names the case; a switched-on method, its section
    ids=lambda o: o[0].split(".")[0] if o[0].endswith("=true") else o[0].split("=")[1],
)
def test_every_capability_runs_on_a_vlm(vlm_config, overrides, restore_threads):
    result = fedsim.run(vlm_config("llava", "rounds=2", *overrides), executor=LocalExecutor())
    final = result.history[-1]
    assert final["clients/failed"] == 0 and final["clients/rejected"] == 0
    assert 0.0 <= final["global/rouge_l"] <= 1.0
    if "data.target=label" in overrides:  # emoji groups posed as instruction following
        assert 0.0 <= final["global/accuracy"] <= 1.0 and 0.0 <= final["global/macro_f1"] <= 1.0
        assert "personalized/accuracy_mean" in final and "global/answer_valid" in final
    if "eval.every=2" in overrides:
        assert "global/bleu" not in result.history[1] and "global/bleu" in final
        assert "personalized/rouge_l_mean" not in result.history[1]


@pytest.mark.slow
def test_a_resumed_vlm_run_reaches_the_uninterrupted_numbers(
    vlm_config, family_runs, tmp_path, restore_threads
):
    straight = family_runs["llava"]  # the same config, 2 rounds uninterrupted (on Ray)
    first = fedsim.run(
        vlm_config("llava", "rounds=1", f"checkpoint.dir={tmp_path / 'b'}"),
        executor=LocalExecutor(),
    )
    resumed = fedsim.resume(first.run_dir, ["rounds=2"], executor=LocalExecutor())
    assert [_numbers(h) for h in resumed.history] == [_numbers(h) for h in straight.history]


def test_generative_config_errors_name_the_key(tiny_vlms):
    with pytest.raises(ConfigError, match="model.name_or_path"):
        load_config(None, ["model.backbone=hf-vlm"])
    with pytest.raises(ConfigError, match="data.image_fill"):
        load_config(None, ["model.backbone=smolvlm-effnet", "data.image_fill=learned"])
    with pytest.raises(ConfigError, match="data.dataset"):
        load_config(None, ["data.dataset=llava", "data.root=/tmp"])
    with pytest.raises(ConfigError, match="eval.every"):
        load_config(None, ["eval.every=0"])


def test_a_model_that_cannot_load_is_a_config_error(tmp_path):
    from fedsim.models.backbone import build_backbone

    cfg = load_config(None, ["model.backbone=hf-vlm", f"model.name_or_path={tmp_path}"])
    with pytest.raises(ConfigError, match="model.name_or_path"):
        build_backbone(cfg.model, 1)


def test_targets_that_match_nothing_are_a_config_error(tiny_vlms):
    from fedsim.models.backbone import build_backbone

    cfg = load_config(
        None,
        [
            "model.backbone=hf-vlm",
            f"model.name_or_path={tiny_vlms['llava']}",
            "model.targets=[qkv]",
        ],
    )
    with pytest.raises(ConfigError, match="model.targets"):
        build_backbone(cfg.model, 1)


def test_bf16_weights_autocast_and_checkpointing_train_and_generate_on_cpu(vlm_config):
    """The GPU settings of the cluster configs, exercised on the CPU with a tiny LLaVA."""
    from actors.client import ClientWorker
    from fedsim.messages import Broadcast, ClientTask

    cfg = vlm_config(
        "llava",
        "train.precision=bf16",
        "model.dtype=bfloat16",
        "model.gradient_checkpointing=true",
    )
    worker = ClientWorker(cfg)
    lm = worker.backbone.model.model.language_model
    assert lm.layers[0].self_attn.o_proj.weight.dtype == torch.bfloat16
    assert worker.backbone.model.is_activation_checkpointing
    initial = worker.initial_global()
    assert all(v.dtype == torch.float32 for v in initial.values())  # LoRA stays float32
    report, upload, _ = worker.train(ClientTask(0, 8, 1), Broadcast(adapter=initial))
    assert report.steps == 2 and report.train_loss == report.train_loss  # not NaN
    assert all(v.isfinite().all() for v in upload.update.values())
    assert 0.0 <= report.personalized["rouge_l"] <= 1.0


def test_a_missing_model_stops_the_run_before_any_actor_starts(make_config, tmp_path):
    cfg = make_config("model.backbone=hf-vlm", f"model.name_or_path={tmp_path / 'nothing'}")
    with pytest.raises(ConfigError) as info:
        fedsim.run(cfg)
    assert info.value.key == "model.name_or_path"
