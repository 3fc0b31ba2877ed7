"""Models and data that only a worker used to find wrong, refused by the driver's pre-flight.

A model directory that is a classifier, a text-only model, a single file, lacks its tokenizer
or holds a truncated weight file; LoRA targets that match the whole model; a row whose
conversation is longer than the model's context; a string no tokenizer can encode; a test
split that is the training data. Each case runs the ``fedsim`` command line in-process (the
``fails`` fixture of this folder: one ``fedsim:`` line naming the culprit, exit status 2, no
traceback, no checkpoint and no MLflow run); the rest call the pre-flight's parts directly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from vlm_builders import FAMILIES, build_tiny_vlm

from fedsim.config import ConfigError, load_config
from fedsim.data.federated import load_dataset
from fedsim.data.loaders import load_hateful_memes, load_llava
from fedsim.data.overlap import shared_rows

CONTEXT = 512  # the tiny VLMs' max_position_embeddings


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:
    return build_tiny_vlm("llava", tmp_path_factory.mktemp("vlm") / "llava")


def _vlm(path: Path | str) -> list[str]:
    return ["model.backbone=hf-vlm", f"model.name_or_path={path}"]


def _copy(model: Path, to: Path, without: tuple[str, ...] = ()) -> Path:
    """A copy of a model directory without the files named in ``without``."""
    to.mkdir(parents=True)
    for f in model.iterdir():
        if f.name not in without:
            shutil.copy(f, to / f.name)
    return to


# --- the model directory -------------------------------------------------------------------


def test_a_classifier_is_not_a_vlm(fails, base, tmp_path):
    from transformers import BertConfig

    BertConfig(architectures=["BertForSequenceClassification"]).save_pretrained(tmp_path / "m")
    line = fails(["run", *base, *_vlm(tmp_path / "m")], "model.name_or_path")
    assert "BertForSequenceClassification" in line and "image-text-to-text" in line


def test_a_text_only_model_is_not_a_vlm(fails, base, tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path / "m")
    line = fails(["run", *base, *_vlm(tmp_path / "m")], "model.name_or_path")
    assert "LlamaForCausalLM" in line and "not an image-text-to-text model" in line


def test_a_directory_without_tokenizer_files(fails, base, tiny_llava, tmp_path):
    bare = _copy(tiny_llava, tmp_path / "m", ("tokenizer.json", "tokenizer_config.json"))
    line = fails(["run", *base, *_vlm(bare)], "model.name_or_path")
    assert "no tokenizer files" in line


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_single_file_is_not_a_model_directory(fails, base, tiny_llava, name):
    line = fails(["run", *base, *_vlm(tiny_llava / name)], "model.name_or_path")
    assert "is a file" in line and name in line


def test_a_processor_without_a_chat_template(fails, base, tiny_llava, tmp_path):
    bare = _copy(tiny_llava, tmp_path / "m", ("chat_template.jinja",))
    line = fails(["run", *base, *_vlm(bare)], "model.name_or_path")
    assert "chat template" in line


def test_a_truncated_weight_file(fails, base, tiny_llava, tmp_path):
    cut = _copy(tiny_llava, tmp_path / "m")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = fails(["run", *base, *_vlm(cut)], "model.name_or_path")
    assert "model.safetensors" in line and "truncated" in line


def test_a_weight_file_that_is_not_safetensors(fails, base, tiny_llava, tmp_path):
    bad = _copy(tiny_llava, tmp_path / "m")
    (bad / "model.safetensors").write_bytes(b"<html>404: Not Found</html>")
    fails(["run", *base, *_vlm(bad)], "model.safetensors")


def test_no_weight_file(fails, base, tiny_llava, tmp_path):
    bare = _copy(tiny_llava, tmp_path / "m", ("model.safetensors",))
    line = fails(["run", *base, *_vlm(bare)], "model.name_or_path")
    assert "no weight file" in line


def _sharded(model: Path, to: Path) -> Path:
    """The model with its weights split into two safetensors shards and an index."""
    from safetensors.torch import load_file, save_file

    out = _copy(model, to, ("model.safetensors",))
    tensors = load_file(model / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:]), start=1):
        shard = f"model-0000{i}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, out / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return out


def test_a_sharded_model_passes_and_a_missing_shard_is_named(fails, base, tiny_llava, tmp_path):
    from fedsim.models.weight_files import check_weight_files

    model = _sharded(tiny_llava, tmp_path / "m")
    check_weight_files(model, "model.name_or_path")  # complete: no error
    (model / "model-00002-of-00002.safetensors").unlink()
    line = fails(["run", *base, *_vlm(model)], "model.name_or_path")
    assert "model-00002-of-00002.safetensors" in line and "missing" in line


def test_a_shard_that_does_not_hold_its_tensors(tiny_llava, tmp_path):
    from fedsim.models.weight_files import check_weight_files

    model = _sharded(tiny_llava, tmp_path / "m")
    first, second = (model / f"model-0000{i}-of-00002.safetensors" for i in (1, 2))
    first.write_bytes(second.read_bytes())  # a shard saved under another shard's name
    with pytest.raises(ConfigError, match="lacks .* tensor"):
        check_weight_files(model, "model.name_or_path")


def test_a_truncated_pytorch_bin(tmp_path):
    from fedsim.models.weight_files import check_weight_files

    torch.save({"w": torch.ones(64, 64)}, tmp_path / "pytorch_model.bin")
    check_weight_files(tmp_path, "model.name_or_path")  # whole: no error
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) - 100])
    with pytest.raises(ConfigError, match="pytorch_model.bin .*truncated"):
        check_weight_files(tmp_path, "model.name_or_path")


# --- LoRA targets on the meta device -------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tiny_family_passes_with_the_facts_of_its_build(family, tiny_llava, tmp_path):
    """No false refusal: the pre-flight accepts each family and finds what the build finds
    (8 q/v projections of 64 x 64, see tests/vlm_builders.py)."""
    from fedsim.models.vlm_check import inspect_generative

    path = tiny_llava if family == "llava" else build_tiny_vlm(family, tmp_path / family)
    cfg = load_config(None, _vlm(path))
    facts = inspect_generative(cfg.model)
    assert (facts.max_rank, facts.targets, facts.context) == (64, 8, CONTEXT)
    assert (
        facts.codec is not None
        and facts.codec.prompt_overhead(torch.zeros(3, 16, 16, dtype=torch.uint8)) > 0
    )


@pytest.mark.parametrize(
    ("overrides", "culprit", "words"),
    [
        (["model.target_regex=.*"], "model.target_regex", "the model itself among them"),
        (["model.target_regex=.*layers\\.0"], "model.target_regex", "CLIPEncoderLayer"),
        (["model.target_regex=.*embed_tokens"], "model.target_regex", "Embedding"),
        (["model.targets=[mlp]"], "model.targets", "not Linear or Conv2d"),
        (["model.target_regex=nothing"], "model.target_regex", "no module"),
        (["clients.ranks=[128,8,4,4,2,2]"], "clients.ranks", "at most rank 64"),
    ],
    ids=["whole-model", "a-block", "embedding", "targets-suffix", "no-match", "rank-cap"],
)
def test_lora_targets_are_checked_before_any_actor(
    fails, base, tiny_llava, overrides, culprit, words
):
    line = fails(["run", *base, *_vlm(tiny_llava), *overrides], culprit)
    assert words in line
    assert len(line) < 400  # counts and one example, not a model dump


def test_the_built_in_vlm_targets_are_matched_without_converting_it(fails, base, monkeypatch):
    from fedsim.models import smollm

    def no_conversion(*args):
        raise AssertionError("the pre-flight converted SmolLM2")

    monkeypatch.setattr(smollm, "smollm2_dir", no_conversion)
    args = ["model.backbone=smolvlm-effnet", "model.target_regex=.*"]
    line = fails(["run", *base, *args], "model.target_regex")
    assert "the model itself among them" in line


def test_the_built_in_vlm_shape_is_that_of_its_converted_config():
    from fedsim.data.emoji import default_cache_dir
    from fedsim.models.smollm import ARCHITECTURE, _complete, cache_key, smollm2_gguf

    converted = default_cache_dir() / f"smollm2-135m-instruct-{cache_key(smollm2_gguf())}"
    if not _complete(converted):
        pytest.skip("SmolLM2 is not converted in this cache (tests/fedsim/models covers it)")
    config = json.loads((converted / "config.json").read_text())
    assert {k: config[k] for k in ARCHITECTURE} == ARCHITECTURE


# --- rows against the model's context ------------------------------------------------------


def _png(path: Path, color=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), color).save(path)


def _record(i: int, answer: str = "a red face", prompt: str = "What is shown?") -> dict:
    return {
        "image": f"img/{i % 3}.png",
        "conversations": [
            {"from": "human", "value": f"<image>\n{prompt}"},
            {"from": "gpt", "value": answer},
        ],
    }


def _llava(root: Path, train: list[dict] | None = None, test: list[dict] | None = None) -> Path:
    """A LLaVA directory: 20 train and 4 test records over three images unless given."""
    for i in range(3):
        _png(root / "img" / f"{i}.png", (60 * i, 30, 30))
    train = train if train is not None else [_record(i, f"answer {i}") for i in range(20)]
    test = test if test is not None else [_record(i, f"held out {i}") for i in range(4)]
    (root / "train.json").write_text(json.dumps(train))
    (root / "test.json").write_text(json.dumps(test))
    return root


def _llava_args(root: Path) -> list[str]:
    return [
        "data.dataset=llava",
        f"data.root={root}",
        "clients.num=2",
        "clients.ranks=[4,4]",
        "clients.fraction=1",
        "data.min_per_client=2",
        "data.subset=null",
    ]


def test_a_one_megabyte_answer_is_a_bad_row(fails, base, tiny_llava, tmp_path):
    train = [_record(i, f"answer {i}") for i in range(20)]
    train[6] = _record(6, "a red face " * 100_000)  # 1.1 MB
    root = _llava(tmp_path / "llava", train=train)
    line = fails(["run", *base, *_vlm(tiny_llava), *_llava_args(root)], "data.root")
    assert "train.json item 7" in line and f"context of {CONTEXT} tokens" in line
    assert "data.on_error=skip" in line


def test_a_prompt_longer_than_the_context_is_a_bad_row(fails, base, tiny_llava, tmp_path):
    test = [_record(i, "fine") for i in range(4)]
    test[2] = _record(2, "fine", prompt="describe the red face " * 300)
    root = _llava(tmp_path / "llava", test=test)
    args = [*_vlm(tiny_llava), *_llava_args(root), "data.max_text_tokens=2048"]
    line = fails(["run", *base, *args], "data.root")
    assert "test.json item 3" in line


def _cfg(tiny_overrides, *overrides: str):
    return load_config(None, [*tiny_overrides, *overrides])


def _sequence_length(codec, image, prompt: str, answer: str) -> int:
    from fedsim.models.vlm import Sample

    batch = codec.encode_train([Sample(image, prompt, answer)])
    return int(batch["attention_mask"].sum())


def test_a_row_that_just_fits_is_kept_and_one_token_more_is_not(
    tiny_overrides, tiny_llava, tmp_path
):
    """The exact count at the boundary: a conversation of CONTEXT tokens trains, one more
    token does not."""
    from fedsim.models.vlm import hf_codec
    from fedsim.tasks.context import fit_rows

    codec = hf_codec(str(tiny_llava))
    root = _llava(tmp_path / "probe")
    cfg = _cfg(tiny_overrides, *_vlm(tiny_llava), *_llava_args(root))
    dataset = load_dataset(cfg)
    image, prompt = dataset.images[0], dataset.texts[0]
    answer = ("face " * 1_000).split()
    words = next(
        n
        for n in range(400, 1_000)
        if _sequence_length(codec, image, prompt, " ".join(answer[:n])) > CONTEXT
    )
    fits, over = " ".join(answer[: words - 1]), " ".join(answer[:words])
    assert _sequence_length(codec, image, prompt, fits) == CONTEXT  # a word is a token here
    train = [_record(i, f"answer {i}") for i in range(20)]
    train[0] = _record(0, fits)
    train[1] = _record(0, over)
    root = _llava(tmp_path / "edge", train=train)
    cfg = _cfg(tiny_overrides, *_vlm(tiny_llava), *_llava_args(root))
    with pytest.raises(ConfigError, match="train.json item 2: its conversation is 513 tokens"):
        fit_rows(cfg, load_dataset(cfg), codec)
    skip = _cfg(tiny_overrides, *_vlm(tiny_llava), *_llava_args(root), "data.on_error=skip")
    kept = fit_rows(skip, load_dataset(skip), codec)
    assert fits in kept.targets and over not in kept.targets


def test_with_skip_the_rows_that_do_not_fit_are_left_out_and_recorded(
    tiny_overrides, tiny_llava, tmp_path, capsys
):
    from fedsim.simulation.preflight import check_inputs
    from fedsim.tasks.context import fit_rows

    train = [_record(i, f"answer {i}") for i in range(20)]
    train[3] = _record(3, "face " * 2_000)
    test = [_record(i, "fine") for i in range(4)]
    test[1] = _record(1, "face " * 2_000)
    root = _llava(tmp_path / "llava", train=train, test=test)
    cfg = _cfg(tiny_overrides, *_vlm(tiny_llava), *_llava_args(root), "data.on_error=skip")
    dataset = check_inputs(cfg)
    err = capsys.readouterr().err
    assert len(dataset) == 22 and len(dataset.test_rows) == 3
    assert dataset.test_rows.tolist() == [19, 20, 21]
    assert [(s.file, s.row) for s in dataset.skipped] == [("train.json", 4), ("test.json", 2)]
    assert all("context of 512 tokens" in s.reason for s in dataset.skipped)
    assert "skipped 2 of 24 rows longer than the model's context" in err
    # a worker, which builds the codec from its backbone, keeps the same rows
    again = fit_rows(cfg, load_dataset(cfg), codec=None)
    assert again.texts == dataset.texts and again.targets == dataset.targets
    assert again.test_rows.tolist() == dataset.test_rows.tolist()


def test_rows_under_the_bound_are_not_tokenized(tiny_overrides, tiny_llava, tmp_path, monkeypatch):
    """The default data's rows are far under the context: the pre-flight counts none."""
    from fedsim.models.vlm import ChatCodec
    from fedsim.tasks.context import fit_rows

    def counted(*args, **kwargs):
        raise AssertionError("a short row was tokenized")

    monkeypatch.setattr(ChatCodec, "encode_train", counted)
    cfg = _cfg(tiny_overrides, *_vlm(tiny_llava))
    dataset = load_dataset(cfg)
    assert fit_rows(cfg, dataset) is dataset


def test_the_byte_bound_holds_for_the_tiny_tokenizer(tiny_llava):
    from fedsim.models.vlm import hf_codec

    tokenizer = hf_codec(str(tiny_llava)).tokenizer
    rng = np.random.default_rng(0)
    alphabet = list("ab c\n\t.,!é中😀") + ["<image>", "<|end|>"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(1, 60))))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) <= len(text.encode()), text


# --- strings no tokenizer can encode -------------------------------------------------------


def test_a_lone_surrogate_in_a_prompt_is_a_bad_row(fails, base, tiny_llava, tmp_path):
    root = _llava(tmp_path / "llava")
    text = (root / "train.json").read_text()
    (root / "train.json").write_text(text.replace("What is shown?", "What \\ud800 is shown?", 1))
    line = fails(["run", *base, *_vlm(tiny_llava), *_llava_args(root)], "data.root")
    assert "train.json item 1" in line and "lone surrogate (U+D800" in line


def _memes(root: Path, train: list[dict], dev: list[dict]) -> Path:
    for i in range(3):
        _png(root / "img" / f"{i}.png", (60 * i, 30, 30))
    for split, rows in (("train", train), ("dev", dev)):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _meme(i: int, img: str | None = None, text: str | None = None) -> dict:
    return {"id": i, "img": img or f"img/{i % 3}.png", "label": i % 2, "text": text or f"meme {i}"}


def _memes_args(root: Path) -> list[str]:
    return [
        "data.dataset=hateful_memes",
        f"data.root={root}",
        "clients.num=2",
        "clients.ranks=[4,4]",
        "clients.fraction=1",
        "data.min_per_client=2",
        "data.subset=null",
    ]


def test_a_lone_surrogate_in_a_meme_text_is_a_bad_row(fails, base, tmp_path):
    train = [_meme(i) for i in range(40)]
    root = _memes(tmp_path / "memes", train, [_meme(100 + i) for i in range(6)])
    lines = (root / "train.jsonl").read_text().splitlines()
    lines[4] = lines[4].replace("meme 4", "meme \\udc80 4")
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    line = fails(["run", *base, *_memes_args(root)], "data.root")
    assert "train.jsonl line 5" in line and "U+DC80" in line


def test_with_skip_a_lone_surrogate_is_left_out(tmp_path):
    root = _llava(tmp_path / "llava")
    text = (root / "train.json").read_text()
    (root / "train.json").write_text(text.replace("answer 2", "answer \\ud83d 2"))
    caps, report = load_llava(root / "train.json", 8, on_error="skip")
    assert len(caps) == 19 and report.skipped_rows[0].row == 3
    assert "conversation turn 2 holds a lone surrogate" in report.skipped_rows[0].reason
    assert report.kept_rows == [r for r in range(1, 21) if r != 3]


def test_a_surrogate_pair_written_as_escapes_is_text(tmp_path):
    """An emoji escaped as a UTF-16 pair in JSON is one character, not a lone surrogate."""
    root = _memes(tmp_path / "memes", [_meme(0)], [])
    text = (root / "train.jsonl").read_text()
    (root / "train.jsonl").write_text(text.replace("meme 0", "\\ud83d\\ude00"))
    ds, report = load_hateful_memes(root, "train", 8)
    assert ds.texts == ["\U0001f600"] and report.skipped == 0


# --- test rows that are training rows ------------------------------------------------------


def test_a_test_file_copied_from_the_train_file_is_refused(fails, base, tmp_path):
    train = [_meme(i) for i in range(40)]
    root = _memes(tmp_path / "memes", train, train[:6])
    line = fails(["run", *base, *_memes_args(root)], "data.test_split")
    assert "dev.jsonl" in line and "every row" in line and "(6)" in line


def test_copied_rows_with_renamed_image_files_are_still_training_rows(fails, base, tmp_path):
    """The images are compared by their pixels: a copy under another name is the same image."""
    train = [_meme(i) for i in range(40)]
    root = _memes(tmp_path / "memes", train, [])
    for i in range(3):
        shutil.copy(root / "img" / f"{i}.png", root / "img" / f"copy{i}.png")
    dev = [_meme(i, img=f"img/copy{i % 3}.png") for i in range(6)]
    (root / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev))
    fails(["run", *base, *_memes_args(root)], "data.test_split")


def test_a_partial_overlap_is_a_warning_with_the_count(tiny_overrides, tmp_path, capsys):
    train = [_meme(i) for i in range(40)]
    dev = [*train[:2], *(_meme(100 + i) for i in range(4))]
    root = _memes(tmp_path / "memes", train, dev)
    cfg = _cfg(tiny_overrides, *_memes_args(root))
    dataset = load_dataset(cfg)
    err = capsys.readouterr().err
    assert len(dataset.test_rows) == 6
    assert "2 of 6 rows of dev.jsonl are also rows of train.jsonl" in err
    assert "the first: dev.jsonl line 1" in err


def test_a_row_is_its_image_text_and_answer():
    images = torch.zeros(3, 3, 4, 4, dtype=torch.uint8)
    images[1] += 1
    train = [("a", 0), ("b", 0), ("c", 1)]
    test = [("a", 0), ("x", 0), ("b", 0), ("c", 0)]
    shared = shared_rows(images, train, images[[0, 1, 2, 2]], test)
    # 1: another text; 2: text b with another image; 3: another answer
    assert shared.tolist() == [0]


def test_a_worker_keeps_the_rows_the_driver_kept(
    tiny_overrides, tiny_llava, tmp_path, restore_threads
):
    """With skip, the client worker (the actor's plain class) leaves out the same rows as the
    pre-flight, so the clients' splits agree."""
    from actors.client import ClientWorker
    from fedsim.data.federated import FederatedData
    from fedsim.simulation.preflight import check_inputs

    train = [_record(i, f"answer {i}") for i in range(20)]
    train[5] = _record(5, "face " * 2_000)
    root = _llava(tmp_path / "llava", train=train)
    cfg = _cfg(tiny_overrides, *_vlm(tiny_llava), *_llava_args(root), "data.on_error=skip")
    driver = check_inputs(cfg)
    worker = ClientWorker(cfg)
    assert worker.data.dataset.targets == driver.targets and len(driver) == 23
    sizes = [len(c.train) for c in FederatedData(cfg, driver).clients]
    assert worker.describe().client_train_sizes == sizes


def test_the_partition_command_refuses_the_row_a_run_refuses(fails, base, tiny_llava, tmp_path):
    train = [_record(i, f"answer {i}") for i in range(20)]
    train[2] = _record(2, "face " * 2_000)
    root = _llava(tmp_path / "llava", train=train)
    line = fails(["partition", *base, *_vlm(tiny_llava), *_llava_args(root)], "data.root")
    assert "train.json item 3" in line


def test_the_python_api_stops_before_any_worker(tiny_overrides, tiny_llava, workdir):
    import fedsim
    from actors.executor import LocalExecutor

    def no_worker(*args, **kwargs):
        raise AssertionError("a worker was started")

    cfg = _cfg(tiny_overrides, *_vlm(tiny_llava), "model.target_regex=.*", "checkpoint.dir=runs")
    executor = LocalExecutor()
    executor.make_pool = no_worker
    with pytest.raises(ConfigError) as info:
        fedsim.run(cfg, executor=executor)
    assert info.value.key == "model.target_regex"
    assert not (workdir / "runs").exists()
