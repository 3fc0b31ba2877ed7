"""Benchmark loaders: Hateful Memes JSONL, CrisisMMD TSV and LLaVA JSON, built tiny in tmp."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from fedsim.config import ConfigError
from fedsim.data.federated import load_dataset
from fedsim.data.loaders import (
    UNLABELED,
    DataError,
    SkippedRow,
    load_crisismmd,
    load_hateful_memes,
    load_llava,
)

S = 8
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _image(path: Path, size: tuple[int, int], color=RED, mode: str = "RGB") -> str:
    """Write a solid image of ``size`` (w, h); returns its name relative to the parent's parent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return f"{path.parent.name}/{path.name}"


def _jsonl(path: Path, rows: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


# --- Hateful Memes ---------------------------------------------------------------------------


@pytest.fixture
def memes(tmp_path: Path) -> Path:
    """Three train rows, two dev rows, two unlabelled test rows; PNGs of three sizes."""
    a = _image(tmp_path / "img" / "1.png", (40, 30), RED)
    b = _image(tmp_path / "img" / "2.png", (20, 50), GREEN)
    c = _image(tmp_path / "img" / "3.png", (33, 33), BLUE)
    _jsonl(
        tmp_path / "train.jsonl",
        [
            {"id": 1, "img": a, "label": 0, "text": "first meme"},
            {"id": 2, "img": b, "label": 1, "text": "second meme"},
            {"id": 3, "img": c, "label": 1, "text": "third meme"},
        ],
    )
    _jsonl(
        tmp_path / "dev.jsonl",
        [
            {"id": 1, "img": a, "label": 1, "text": "d1"},
            {"id": 2, "img": b, "label": 0, "text": ""},
        ],
    )
    _jsonl(
        tmp_path / "test.jsonl",
        [{"id": 1, "img": a, "text": "t1"}, {"id": 3, "img": c, "label": 1, "text": "t3"}],
    )
    return tmp_path


def test_hateful_memes_train(memes):
    ds, report = load_hateful_memes(memes, "train", S)
    assert ds.images.shape == (3, 3, S, S) and ds.images.dtype == torch.uint8
    assert ds.labels.tolist() == [0, 1, 1] and ds.labels.dtype == torch.int64
    assert ds.classes == ["not_hateful", "hateful"]
    assert ds.texts == ["first meme", "second meme", "third meme"]
    # solid images stay solid at any source size and aspect
    assert ds.images[0, :, 0, 0].tolist() == list(RED)
    assert (ds.images[1] == torch.tensor(GREEN, dtype=torch.uint8)[:, None, None]).all()
    assert (report.rows, report.kept, report.skipped, report.skipped_rows) == (3, 3, 0, [])


def test_hateful_memes_dev_and_unlabelled_test(memes):
    dev, _ = load_hateful_memes(memes, "dev", S)
    assert dev.labels.tolist() == [1, 0] and dev.texts == ["d1", ""]
    test, report = load_hateful_memes(memes, "test", S)
    assert test.labels.tolist() == [UNLABELED, 1]
    assert report.kept == 2


BAD_MEME_ROWS = [  # (line 2 of train.jsonl, the reason DataError must name)
    ("{not json", "bad JSON"),
    ('["a list"]', "expected a JSON object"),
    ({"img": "img/2.png", "label": 1}, "missing field 'text'"),
    ({"img": "img/2.png", "text": "x"}, "missing field 'label'"),
    ({"img": 7, "text": "x", "label": 1}, "field 'img' must be str"),
    ({"img": "img/9.png", "text": "x", "label": 1}, "image img/9.png not found under "),
    ({"img": "img/junk.png", "text": "x", "label": 1}, "image img/junk.png unreadable"),
    ({"img": "img/2.png", "text": "x", "label": 2}, "bad label 2"),
    ({"img": "img/2.png", "text": "x", "label": True}, "bad label True"),
    (b'{"img": "img/2.png", "text": "\xff", "label": 1}', "not valid UTF-8"),
]


@pytest.mark.parametrize("row, reason", BAD_MEME_ROWS)
def test_hateful_memes_bad_row_raises_or_skips(memes, row, reason):
    (memes / "img" / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    lines = [
        json.dumps({"img": "img/1.png", "text": "ok", "label": 0}).encode(),
        row
        if isinstance(row, bytes)
        else (row if isinstance(row, str) else json.dumps(row)).encode(),
        b"",  # blank lines are not rows
        json.dumps({"img": "img/3.png", "text": "ok too", "label": 1}).encode(),
    ]
    (memes / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    with pytest.raises(DataError, match=f"^train.jsonl line 2: {reason}") as info:
        load_hateful_memes(memes, "train", S)
    assert (info.value.file, info.value.row) == ("train.jsonl", 2)

    ds, report = load_hateful_memes(memes, "train", S, on_error="skip")
    assert ds.texts == ["ok", "ok too"] and ds.labels.tolist() == [0, 1]
    assert (report.rows, report.kept, report.skipped) == (3, 2, 1)
    [skipped] = report.skipped_rows
    assert isinstance(skipped, SkippedRow) and skipped[:2] == ("train.jsonl", 2)
    assert skipped.reason.startswith(reason)


def test_hateful_memes_message_names_image_root(memes):
    _jsonl(
        memes / "dev.jsonl",
        [{"img": "img/3.png", "text": "x", "label": 0}] * 2
        + [{"img": "img/404.png", "text": "x", "label": 0}],
    )
    with pytest.raises(DataError) as info:
        load_hateful_memes(memes, "dev", S)
    assert str(info.value) == f"dev.jsonl line 3: image img/404.png not found under {memes}"


def test_hateful_memes_all_rows_skipped_gives_empty_dataset(memes):
    _jsonl(memes / "dev.jsonl", [{"img": "img/404.png", "text": "x", "label": 0}])
    ds, report = load_hateful_memes(memes, "dev", S, on_error="skip")
    assert ds.images.shape == (0, 3, S, S) and ds.labels.shape == (0,) and len(ds) == 0
    assert (report.rows, report.kept, report.skipped) == (1, 0, 1)


# --- image preprocessing ---------------------------------------------------------------------


def test_images_centre_cropped_then_resized(tmp_path):
    wide = Image.new("RGB", (90, 30), RED)  # red | green | red thirds: the centre square is green
    wide.paste(GREEN, (30, 0, 60, 30))
    wide.save(tmp_path / "wide.png")
    rgba = Image.new("RGBA", (10, 20), (0, 0, 0, 0))  # fully transparent: white, not black
    rgba.save(tmp_path / "clear.png")
    Image.new("L", (12, 12), 128).save(tmp_path / "grey.jpg")
    _jsonl(
        tmp_path / "train.jsonl",
        [{"img": name, "text": "", "label": 0} for name in ("wide.png", "clear.png", "grey.jpg")],
    )
    ds, _ = load_hateful_memes(tmp_path, "train", 5)
    assert ds.images.shape == (3, 3, 5, 5)
    # Squashing would leave red side columns; LANCZOS draws a little red in past the crop edge.
    red, green, blue = ds.images[0]
    assert red.max() < 40 and green.min() > 215 and blue.max() < 40
    assert (ds.images[1] == 255).all()
    assert (ds.images[2].to(torch.int16) - 128).abs().max() <= 2


# --- CrisisMMD -------------------------------------------------------------------------------

HEADER = [
    "event_name",
    "tweet_id",
    "image_id",
    "tweet_text",
    "image",
    "label",
    "label_text",
    "label_image",
    "label_text_image",
]


def _tsv_row(root: Path, n: int, label: str, text: str, size=(30, 20)) -> list[str]:
    rel = f"data_image/fire/{n}_0.jpg"
    (root / "data_image" / "fire").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (n * 20 % 256, 0, 0)).save(root / rel)
    return ["fire", str(n), f"{n}_0", text, rel, label, label, label, "Positive"]


def _write_tsv(path: Path, rows: list[list[str]]) -> None:
    path.write_text("\n".join("\t".join(r) for r in [HEADER, *rows]) + "\n", encoding="utf-8")


@pytest.fixture
def crisis(tmp_path: Path) -> Path:
    """Four train rows over three labels, two dev rows, one test row; JPEGs of two sizes."""
    _write_tsv(
        tmp_path / "task_humanitarian_text_img_train.tsv",
        [
            _tsv_row(tmp_path, 1, "not_humanitarian", "RT smoke over the hills"),
            _tsv_row(tmp_path, 2, "affected_individuals", '"Evacuate now" says sheriff'),
            _tsv_row(tmp_path, 3, "rescue_volunteering_or_donation_effort", "donate", (15, 40)),
            _tsv_row(tmp_path, 4, "affected_individuals", "families displaced"),
        ],
    )
    _write_tsv(
        tmp_path / "task_humanitarian_text_img_dev.tsv",
        [
            _tsv_row(tmp_path, 5, "rescue_volunteering_or_donation_effort", "volunteers"),
            _tsv_row(tmp_path, 6, "not_humanitarian", "sunset"),
        ],
    )
    _write_tsv(
        tmp_path / "task_humanitarian_text_img_test.tsv",
        [_tsv_row(tmp_path, 7, "affected_individuals", "shelter open")],
    )
    return tmp_path


CRISIS_CLASSES = [
    "affected_individuals",
    "not_humanitarian",
    "rescue_volunteering_or_donation_effort",
]


def test_crisismmd_splits(crisis):
    train, report = load_crisismmd(crisis, "train", S)
    assert train.images.shape == (4, 3, S, S) and train.images.dtype == torch.uint8
    assert train.classes == CRISIS_CLASSES
    assert train.labels.tolist() == [1, 0, 2, 0]
    assert train.texts[1] == '"Evacuate now" says sheriff'  # quotes kept as written
    assert train.images[0, 0, 0, 0].item() == 20 and train.images[0, 1:].max() <= 2  # JPEG red
    assert (report.rows, report.kept, report.skipped) == (4, 4, 0)
    dev, _ = load_crisismmd(crisis, "dev", S)
    assert dev.classes == CRISIS_CLASSES and dev.labels.tolist() == [2, 1]
    assert dev.texts == ["volunteers", "sunset"]
    test, _ = load_crisismmd(crisis, "test", S)
    assert test.labels.tolist() == [0]


def test_crisismmd_label_unseen_in_train_is_bad_label(crisis):
    rows = [
        _tsv_row(crisis, 5, "not_humanitarian", "a"),
        _tsv_row(crisis, 6, "missing_people", "b"),
    ]
    _write_tsv(crisis / "task_humanitarian_text_img_dev.tsv", rows)
    with pytest.raises(
        DataError, match="^task_humanitarian_text_img_dev.tsv line 3: bad label 'missing_people'"
    ):
        load_crisismmd(crisis, "dev", S)
    ds, report = load_crisismmd(crisis, "dev", S, on_error="skip")
    assert ds.labels.tolist() == [1] and ds.classes == CRISIS_CLASSES
    assert report.skipped_rows == [
        (
            "task_humanitarian_text_img_dev.tsv",
            3,
            "bad label 'missing_people' (not a label of the train split)",
        )
    ]


@pytest.mark.parametrize(
    "mangle, reason",
    [
        (lambda r: r[:5], "expected 9 columns, got 5"),
        (lambda r: [*r, "extra"], "expected 9 columns, got 10"),
        (lambda r: r[:4] + ["data_image/fire/404.jpg"] + r[5:], "image data_image/fire/404.jpg "),
        (lambda r: r[:4] + [""] + r[5:], "empty field 'image'"),
        (lambda r: r[:5] + [""] + r[6:], "bad label ''"),
    ],
)
def test_crisismmd_bad_row_raises_or_skips(crisis, mangle, reason):
    train = crisis / "task_humanitarian_text_img_train.tsv"
    lines = train.read_text().splitlines()
    lines[2] = "\t".join(mangle(lines[2].split("\t")))  # line 3 of the file, tweet 2
    train.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"^task_humanitarian_text_img_train.tsv line 3: {reason}"):
        load_crisismmd(crisis, "train", S)
    ds, report = load_crisismmd(crisis, "train", S, on_error="skip")
    assert len(ds) == 3 and (report.rows, report.kept, report.skipped) == (4, 3, 1)
    assert report.skipped_rows[0][:2] == ("task_humanitarian_text_img_train.tsv", 3)


def test_crisismmd_header_without_label_column(crisis):
    path = crisis / "task_humanitarian_text_img_test.tsv"
    path.write_text("tweet_id\ttweet_text\timage\n1\tx\tdata_image/fire/7_0.jpg\n")
    with pytest.raises(DataError, match=r"_test.tsv line 1: header lacks column\(s\) label"):
        load_crisismmd(crisis, "test", S, on_error="skip")


def test_crisismmd_needs_train_split_for_classes(crisis):
    train = crisis / "task_humanitarian_text_img_train.tsv"
    train.unlink()
    with pytest.raises(DataError, match="task_humanitarian_text_img_train.tsv: file not found"):
        load_crisismmd(crisis, "dev", S)


# --- LLaVA -----------------------------------------------------------------------------------


def _llava_records(root: Path) -> list[dict]:
    a = _image(root / "coco" / "a.jpg", (64, 48), RED)
    b = _image(root / "coco" / "b.png", (16, 16), BLUE)
    return [
        {
            "id": "a",
            "image": a,
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image briefly."},
                {"from": "gpt", "value": "A red square."},
                {"from": "human", "value": "And the border?"},
                {"from": "gpt", "value": "There is none."},
            ],
        },
        {
            "id": "b",
            "image": b,
            "conversations": [
                {"from": "human", "value": "What colour is this? <image>"},
                {"from": "gpt", "value": "Blue."},
            ],
        },
    ]


@pytest.mark.parametrize("name", ["captions.json", "captions.jsonl", "captions.txt"])
def test_llava_json_and_jsonl(tmp_path, name):
    records = _llava_records(tmp_path)
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text(json.dumps(records, indent=2))
    else:
        _jsonl(path, records)
    ds, report = load_llava(path, S)
    assert ds.images.shape == (2, 3, S, S) and ds.images.dtype == torch.uint8
    assert ds.prompts == ["Describe the image briefly.", "What colour is this?"]
    assert ds.targets == ["A red square.", "Blue."]
    assert ds.images[1, :, 3, 3].tolist() == list(BLUE)
    assert (report.rows, report.kept, report.skipped) == (2, 2, 0)
    assert ds.subset([1]).targets == ["Blue."] and len(ds.subset([1])) == 1


def test_llava_image_root(tmp_path):
    records = _llava_records(tmp_path / "images")
    path = tmp_path / "ann" / "llava.json"
    path.parent.mkdir()
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match="^llava.json item 1: image coco/a.jpg not found under"):
        load_llava(path, S)
    ds, _ = load_llava(path, S, image_root=tmp_path / "images")
    assert len(ds) == 2


@pytest.mark.parametrize(
    "mangle, reason",
    [
        (lambda r: 5, "expected a JSON object, got int"),
        (lambda r: {k: v for k, v in r.items() if k != "image"}, "missing field 'image'"),
        (lambda r: {**r, "conversations": "hi"}, "field 'conversations' must be list"),
        (lambda r: {**r, "conversations": r["conversations"][:1]}, "no 'gpt' turn"),
        (lambda r: {**r, "conversations": [{"value": "x"}]}, "conversation turn 1 has no 'from'"),
        (lambda r: {**r, "image": "coco/none.jpg"}, "image coco/none.jpg not found"),
    ],
)
@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_llava_bad_record_raises_or_skips(tmp_path, mangle, reason, fmt):
    records = _llava_records(tmp_path)
    records.insert(1, mangle(records[0]))
    path = tmp_path / f"data.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(records))
    else:
        _jsonl(path, records)
    unit = "item" if fmt == "json" else "line"
    with pytest.raises(DataError, match=f"^data.{fmt} {unit} 2: {reason}"):
        load_llava(path, S)
    ds, report = load_llava(path, S, on_error="skip")
    assert ds.targets == ["A red square.", "Blue."]
    assert (report.rows, report.kept, report.skipped) == (3, 2, 1)
    assert report.skipped_rows[0][:2] == (f"data.{fmt}", 2)


def test_llava_broken_json_list_always_raises(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"image": "a.jpg",\n  oops\n]')
    with pytest.raises(DataError, match="^data.json line 3: bad JSON"):
        load_llava(path, S, on_error="skip")


# --- arguments and missing files -------------------------------------------------------------


def test_missing_split_file_names_expected_path(memes, crisis, tmp_path):
    (memes / "dev.jsonl").unlink()
    with pytest.raises(DataError, match=f"^{memes / 'dev.jsonl'}: file not found$"):
        load_hateful_memes(memes, "dev", S)
    (crisis / "task_humanitarian_text_img_test.tsv").unlink()
    with pytest.raises(DataError, match="task_humanitarian_text_img_test.tsv: file not found"):
        load_crisismmd(crisis, "test", S)
    with pytest.raises(DataError, match="nothing.json: file not found"):
        load_llava(tmp_path / "nothing.json", S)


def test_bad_arguments_list_the_allowed_values(memes, crisis, tmp_path):
    with pytest.raises(ValueError, match="split must be one of train, dev, test, dev_seen"):
        load_hateful_memes(memes, "validation", S)
    with pytest.raises(ValueError, match="split must be one of train, dev, test; got 'val'"):
        load_crisismmd(crisis, "val", S)
    with pytest.raises(ValueError, match="on_error must be one of raise, skip; got 'ignore'"):
        load_crisismmd(crisis, "train", S, on_error="ignore")
    with pytest.raises(ValueError, match="on_error must be one of raise, skip"):
        load_llava(tmp_path / "x.json", S, on_error="warn")
    with pytest.raises(ValueError, match="image_size must be at least 1"):
        load_hateful_memes(memes, "train", 0)


def test_hateful_memes_runs_end_to_end_with_auc(tmp_path, make_config):
    """The loader wired through config: a federated round on a tiny Hateful Memes copy."""
    import json

    import torch
    from PIL import Image

    from actors.client import ClientWorker
    from fedsim.messages import Broadcast, ClientTask

    (tmp_path / "img").mkdir()
    for split, n in (("train", 40), ("dev", 12)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for i in range(n):
                Image.new("RGB", (20, 30), (i * 5 % 255, 40, 90)).save(
                    tmp_path / f"img/{split}{i}.png"
                )
                # dev rows of their own: a copy of a train row would be refused as training data
                text = f"{split} meme {i}"
                row = {"id": i, "img": f"img/{split}{i}.png", "label": i % 2, "text": text}
                f.write(json.dumps(row) + "\n")
    threads = torch.get_num_threads()
    cfg = make_config(
        "data.dataset=hateful_memes",
        f"data.root={tmp_path}",
        "data.subset=null",
        "clients.num=2",
        "clients.ranks=[4,4]",
        "data.min_per_client=5",
        "editing.enabled=false",
    )
    worker = ClientWorker(cfg)
    assert len(worker.data.test) == 12 and worker.data.num_classes == 2
    report, _, _ = worker.train(ClientTask(0, 4, 1), Broadcast(adapter=worker.initial_global()))
    part = worker.evaluate_global(Broadcast(adapter=worker.initial_global()), 0, 1)
    torch.set_num_threads(threads)
    assert part.probs.shape == (12, 2)
    from fedsim.tasks import combine_parts

    assert "auc" in combine_parts([part])[0]


def test_real_dataset_needs_a_root(make_config):
    from fedsim.config import ConfigError

    with pytest.raises(ConfigError) as info:
        make_config("data.dataset=crisismmd")
    assert info.value.key == "data.root"


# --- LLaVA: bad records, skip reports and splits ---------------------------------------------


def _no_gpt(r: dict) -> dict:
    return {**r, "conversations": [t for t in r["conversations"] if t["from"] != "gpt"]}


def _turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"from": who, "value": value} for who, value in pairs]


BAD_LLAVA_RECORDS = [  # (mangle record a into item/line 2, the exact reason; {root}: the root)
    (lambda r: {**r, "image": "coco/gone.jpg"}, "image coco/gone.jpg not found under {root}"),
    (_no_gpt, "no 'gpt' turn in 'conversations'"),
    (
        lambda r: {
            **r,
            "conversations": _turns(("human", "<image> <image> Compare."), ("gpt", "x")),
        },
        "2 <image> tokens in 'conversations' for 1 image",
    ),
    (
        lambda r: {**r, "conversations": _turns(("human", "<image>\nHi"), ("gpt", "<image> ok"))},
        "2 <image> tokens in 'conversations' for 1 image",
    ),
    (
        lambda r: {**r, "conversations": _turns(("human", "<image>\nHi"), ("gpt", ""))},
        "the first 'gpt' turn is empty",
    ),
    (  # only the first gpt turn is the target: a later answer does not rescue it
        lambda r: {
            **r,
            "conversations": _turns(("human", "Hi"), ("gpt", " \n "), ("human", "?"), ("gpt", "y")),
        },
        "the first 'gpt' turn is empty",
    ),
]


@pytest.mark.parametrize("mangle, reason", BAD_LLAVA_RECORDS)
@pytest.mark.parametrize("fmt", ["json", "jsonl"])
def test_llava_bad_record_message_and_skip_report(tmp_path, mangle, reason, fmt):
    records = _llava_records(tmp_path)
    records.insert(1, mangle(records[0]))
    path = tmp_path / f"data.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(records, indent=2))  # items span lines: numbered by item
    else:
        _jsonl(path, records)
    unit = "item" if fmt == "json" else "line"
    reason = reason.format(root=tmp_path)

    with pytest.raises(DataError) as info:
        load_llava(path, S)
    assert str(info.value) == f"data.{fmt} {unit} 2: {reason}"
    assert (info.value.file, info.value.row, info.value.reason) == (f"data.{fmt}", 2, reason)

    ds, report = load_llava(path, S, on_error="skip")
    assert ds.targets == ["A red square.", "Blue."] and len(ds) == 2
    assert ds.image_paths == ["coco/a.jpg", "coco/b.png"]
    assert (report.rows, report.kept, report.skipped) == (3, 2, 1)
    assert report.skipped_rows == [SkippedRow(f"data.{fmt}", 2, reason)]


def test_llava_skip_reports_every_bad_record_in_file_order(tmp_path):
    good = _llava_records(tmp_path)
    records = [
        {**good[0], "image": "coco/gone.jpg"},
        good[0],
        _no_gpt(good[0]),
        {**good[1], "conversations": _turns(("human", "<image><image>"), ("gpt", "two"))},
        good[1],
        {**good[1], "conversations": _turns(("human", "<image>"), ("gpt", ""))},
    ]
    path = tmp_path / "data.jsonl"
    _jsonl(path, records)
    with pytest.raises(DataError, match="^data.jsonl line 1: image coco/gone.jpg not found"):
        load_llava(path, S)
    ds, report = load_llava(path, S, on_error="skip")
    assert ds.targets == ["A red square.", "Blue."]
    assert (report.rows, report.kept, report.skipped) == (6, 2, 4)
    assert [(r.file, r.row) for r in report.skipped_rows] == [
        ("data.jsonl", 1),
        ("data.jsonl", 3),
        ("data.jsonl", 4),
        ("data.jsonl", 6),
    ]
    assert [r.reason for r in report.skipped_rows] == [
        f"image coco/gone.jpg not found under {tmp_path}",
        "no 'gpt' turn in 'conversations'",
        "2 <image> tokens in 'conversations' for 1 image",
        "the first 'gpt' turn is empty",
    ]


@pytest.mark.parametrize("name", ["train.json", "train.jsonl"])
def test_llava_split_reads_root_split_file(tmp_path, name):
    from fedsim.data.emoji import MultimodalDataset
    from fedsim.data.loaders import LLAVA_CLASSES, load_llava_split

    records = _llava_records(tmp_path)  # image paths relative to the root
    if name.endswith(".json"):
        (tmp_path / name).write_text(json.dumps(records))
    else:
        _jsonl(tmp_path / name, records)
    ds, report = load_llava_split(tmp_path, "train", 32)
    assert isinstance(ds, MultimodalDataset)
    assert ds.images.shape == (2, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.images[1, :, 16, 16].tolist() == list(BLUE)
    assert ds.texts == ["Describe the image briefly.", "What colour is this?"]
    assert ds.targets == ["A red square.", "Blue."]
    assert ds.refs == ["coco/a.jpg", "coco/b.png"]
    assert ds.labels.tolist() == [0, 0] and ds.labels.dtype == torch.int64
    assert ds.classes == LLAVA_CLASSES == ["caption"] and ds.test_rows is None
    assert (report.rows, report.kept, report.skipped) == (2, 2, 0)


def test_llava_split_prefers_json_and_takes_any_split_name(tmp_path):
    from fedsim.data.loaders import load_llava_split

    records = _llava_records(tmp_path)
    (tmp_path / "val.json").write_text(json.dumps(records[:1]))
    _jsonl(tmp_path / "val.jsonl", records)
    ds, report = load_llava_split(tmp_path, "val", S)
    assert ds.targets == ["A red square."] and report.rows == 1


def test_llava_split_missing_file_names_train_json(tmp_path):
    from fedsim.data.loaders import load_llava_split

    _jsonl(tmp_path / "test.jsonl", _llava_records(tmp_path))  # another split is no stand-in
    with pytest.raises(DataError) as info:
        load_llava_split(tmp_path, "train", 32)
    assert str(info.value) == f"{tmp_path / 'train.json'}: file not found (nor train.jsonl)"
    assert info.value.file == str(tmp_path / "train.json") and info.value.row is None


def test_llava_split_bad_records_raise_or_skip(tmp_path):
    from fedsim.data.loaders import load_llava_split

    records = _llava_records(tmp_path)
    records.insert(1, _no_gpt(records[0]))
    (tmp_path / "train.json").write_text(json.dumps(records))
    with pytest.raises(DataError, match="^train.json item 2: no 'gpt' turn in 'conversations'$"):
        load_llava_split(tmp_path, "train", S)
    ds, report = load_llava_split(tmp_path, "train", S, on_error="skip")
    assert ds.targets == ["A red square.", "Blue."] and ds.refs == ["coco/a.jpg", "coco/b.png"]
    assert (report.rows, report.kept, report.skipped) == (3, 2, 1)
    assert report.skipped_rows == [SkippedRow("train.json", 2, "no 'gpt' turn in 'conversations'")]


def test_llava_split_with_no_usable_record_comes_back_empty(tmp_path):
    """As with the other loaders; load_dataset makes an empty split a ConfigError."""
    from fedsim.data.loaders import load_llava_split

    records = [_no_gpt(r) for r in _llava_records(tmp_path)]
    (tmp_path / "train.json").write_text(json.dumps(records))
    ds, report = load_llava_split(tmp_path, "train", S, on_error="skip")
    assert len(ds) == 0 and ds.images.shape == (0, 3, S, S)
    assert (report.rows, report.kept, report.skipped) == (2, 0, 2)


# --- paths confined to the root, deep JSON, and split checks in load_dataset -----------------

KINDS = ["hateful_memes", "crisismmd", "llava-json", "llava-jsonl"]
CRISIS_LABELS = ("affected_individuals", "not_humanitarian")


def _split(kind: str, root: Path, split: str, images: list[str]) -> tuple[str, str, int]:
    """Write ``split`` of ``kind`` under ``root``, one labelled row per image path.

    Returns the file name, the row unit and the row number of the first row.
    """
    root.mkdir(parents=True, exist_ok=True)
    if kind == "hateful_memes":
        rows = [{"img": rel, "text": f"m{i}", "label": i % 2} for i, rel in enumerate(images)]
        _jsonl(root / f"{split}.jsonl", rows)
        return f"{split}.jsonl", "line", 1
    if kind == "crisismmd":
        labels = [CRISIS_LABELS[i % 2] for i in range(len(images))]
        rows = [
            ["fire", str(i), f"{i}_0", f"t{i}", rel, label, label, label, "Positive"]
            for i, (rel, label) in enumerate(zip(images, labels))
        ]
        _write_tsv(root / f"task_humanitarian_text_img_{split}.tsv", rows)
        return f"task_humanitarian_text_img_{split}.tsv", "line", 2  # line 1 is the header
    records = [
        {"image": rel, "conversations": _turns(("human", "<image>\nWhat?"), ("gpt", f"c{i}"))}
        for i, rel in enumerate(images)
    ]
    if kind == "llava-json":
        (root / f"{split}.json").write_text(json.dumps(records))
        return f"{split}.json", "item", 1
    _jsonl(root / f"{split}.jsonl", records)
    return f"{split}.jsonl", "line", 1


def _load(kind: str, root: Path, split: str, **kw):
    from fedsim.data.loaders import load_llava_split

    if kind == "hateful_memes":
        return load_hateful_memes(root, split, S, **kw)
    if kind == "crisismmd":
        return load_crisismmd(root, split, S, **kw)
    return load_llava_split(root, split, S, **kw)


def _good_images(root: Path, n: int = 3) -> list[str]:
    return [_image(root / "img" / f"{i}.png", (12, 10), (40 * i, 0, 0)) for i in range(n)]


def _config(kind: str, root: Path, *overrides: str):
    from fedsim.config import load_config

    generative = ["model.backbone=smolvlm-effnet"] if kind.startswith("llava") else []
    return load_config(
        None,
        [
            f"data.dataset={kind.split('-')[0]}",
            f"data.root={root}",
            f"data.image_size={S}",
            "data.subset=null",
            *generative,
            *overrides,
        ],
    )


def _dotdot(tmp: Path, root: Path) -> str:
    return "../outside.png"


def _absolute(tmp: Path, root: Path) -> str:
    return str(tmp / "outside.png")


def _dotdot_deep(tmp: Path, root: Path) -> str:
    return "img/../../outside.png"


def _symlinked_file(tmp: Path, root: Path) -> str:
    (root / "img" / "link.png").symlink_to(tmp / "outside.png")
    return "img/link.png"


def _symlinked_dir(tmp: Path, root: Path) -> str:
    _image(tmp / "elsewhere" / "x.png", (9, 9), GREEN)
    (root / "ext").symlink_to(tmp / "elsewhere", target_is_directory=True)
    return "ext/x.png"


ESCAPES = [_dotdot, _absolute, _dotdot_deep, _symlinked_file, _symlinked_dir]


@pytest.mark.parametrize("escape", ESCAPES, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("kind", KINDS)
def test_image_path_outside_root_is_a_bad_row(tmp_path, monkeypatch, kind, escape):
    root = tmp_path / "data"
    _image(tmp_path / "outside.png", (9, 9), GREEN)  # exists and is a valid image
    good = _good_images(root)
    rel = escape(tmp_path, root)
    name, unit, first = _split(kind, root, "train", [good[0], rel, good[2]])
    opened: list[Path] = []
    real_open = Image.open
    monkeypatch.setattr(
        Image, "open", lambda fp, *a, **k: opened.append(Path(fp)) or real_open(fp, *a, **k)
    )
    reason = f"image path {rel!r} resolves outside data.root ({root})"

    with pytest.raises(DataError) as info:
        _load(kind, root, "train")
    assert str(info.value) == f"{name} {unit} {first + 1}: {reason}"
    assert (info.value.file, info.value.row) == (name, first + 1)

    ds, report = _load(kind, root, "train", on_error="skip")
    assert len(ds) == 2 and (report.rows, report.kept, report.skipped) == (3, 2, 1)
    assert report.skipped_rows == [SkippedRow(name, first + 1, reason)]
    # the check comes before the file is opened: nothing outside the root was read
    assert len(opened) == 3 and all(p.is_relative_to(root.resolve()) for p in opened)


def test_paths_that_stay_inside_root_are_fine(tmp_path):
    root = tmp_path / "data"
    good = _good_images(root)
    (root / "img" / "alias.png").symlink_to(root / "img" / "1.png")  # a link within the root
    (tmp_path / "link").symlink_to(root, target_is_directory=True)  # the root itself a link
    rows = [good[0], "img/alias.png", "img/../img/2.png", f"{root}/img/0.png"]
    _split("hateful_memes", root, "train", rows)
    ds, report = load_hateful_memes(tmp_path / "link", "train", S)
    assert len(ds) == 4 and report.skipped == 0
    assert ds.images[1, 0, 0, 0].item() == 40  # the alias reads 1.png


def test_image_path_that_cannot_be_resolved_is_a_bad_row(tmp_path):
    root = tmp_path / "data"
    good = _good_images(root)
    (root / "img" / "loop.png").symlink_to(root / "img" / "loop.png")
    _split("hateful_memes", root, "train", [good[0], "img/loop.png", "img/\x00.png"])
    ds, report = load_hateful_memes(root, "train", S, on_error="skip")
    assert len(ds) == 1 and [r.row for r in report.skipped_rows] == [2, 3]
    assert all("image path 'img/" in r.reason for r in report.skipped_rows)


DEEP_LINES = [
    "[" * 100_000,
    '{"a":' * 100_000 + "1" + "}" * 100_000,
    '{"img": "img/0.png", "text": "x", "label": ' + "[" * 100_000 + "]" * 100_000 + "}",
]


@pytest.mark.parametrize("line", DEEP_LINES, ids=["list", "object", "label"])
@pytest.mark.parametrize("kind", ["hateful_memes", "llava-jsonl"])
def test_deeply_nested_json_line_is_a_bad_row(tmp_path, kind, line):
    name, _, _ = _split(kind, tmp_path, "train", _good_images(tmp_path, 2))
    path = tmp_path / name
    path.write_text(path.read_text() + line + "\n")
    reason = "bad JSON (nested too deeply to parse)"
    with pytest.raises(DataError) as info:
        _load(kind, tmp_path, "train")
    assert str(info.value) == f"{name} line 3: {reason}"
    ds, report = _load(kind, tmp_path, "train", on_error="skip")
    assert len(ds) == 2 and report.skipped_rows == [SkippedRow(name, 3, reason)]


@pytest.mark.parametrize(
    "label, reason",
    [
        ("[" * 500 + "]" * 500, "bad label [[[[[[[...]]]]]]] (expected 0 or 1)"),  # parses
        ("1" * 5000, "bad JSON (Exceeds the limit (4300 digits)"),  # int() refuses it
    ],
)
def test_unwieldy_json_values_are_bad_rows(tmp_path, label, reason):
    _good_images(tmp_path, 1)
    (tmp_path / "train.jsonl").write_text(f'{{"img": "img/0.png", "text": "x", "label": {label}}}')
    with pytest.raises(DataError) as info:
        load_hateful_memes(tmp_path, "train", S)
    assert str(info.value).startswith(f"train.jsonl line 1: {reason}")


def test_llava_json_list_nested_too_deeply_names_the_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    for on_error in ("raise", "skip"):
        with pytest.raises(DataError) as info:
            load_llava(path, S, on_error=on_error)
        assert str(info.value) == "data.json: bad JSON (nested too deeply to parse)"
    (tmp_path / "train.json").write_bytes(path.read_bytes())
    _split("llava-json", tmp_path, "dev", _good_images(tmp_path))
    with pytest.raises(ConfigError) as cfg_info:
        load_dataset(_config("llava", tmp_path, "data.test_split=dev"))
    assert cfg_info.value.key == "data.root" and "train.json: bad JSON (nested too deeply" in str(
        cfg_info.value
    )


GARBAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


@pytest.mark.parametrize("kind", KINDS)
def test_binary_split_file_is_an_error_not_a_traceback(tmp_path, kind):
    name, _, _ = _split(kind, tmp_path, "train", _good_images(tmp_path))
    (tmp_path / name).write_bytes((b"[" if kind == "llava-json" else b"") + GARBAGE)
    with pytest.raises(DataError, match=f"^{name}"):
        _load(kind, tmp_path, "train")
    try:
        ds, report = _load(kind, tmp_path, "train", on_error="skip")
    except DataError as err:  # a file that is unusable as a whole (a TSV header, a JSON list)
        assert err.file == name and kind in ("crisismmd", "llava-json")
    else:
        assert len(ds) == 0 and report.skipped == report.rows > 0


@pytest.fixture
def splits(tmp_path):
    """``make(kind)``: a root with train and dev splits of ``kind``, 3 good rows each."""

    def make(kind: str) -> Path:
        images = _good_images(tmp_path)
        _split(kind, tmp_path, "train", images)
        _split(kind, tmp_path, "dev", images[:2])
        return tmp_path

    return make


@pytest.mark.parametrize("kind", KINDS)
def test_load_dataset_records_skipped_rows_of_both_splits(splits, kind):
    root = splits(kind)
    train_name, unit, first = _split(kind, root, "train", ["img/0.png", "../x.png", "img/2.png"])
    dev_name, _, _ = _split(kind, root, "dev", ["img/0.png", "img/1.png", "img/404.png"])
    cfg = _config(kind, root, "data.test_split=dev")
    with pytest.raises(ConfigError) as info:
        load_dataset(cfg)
    assert info.value.key == "data.root" and f"{dev_name} {unit} {first + 2}" in str(info.value)

    ds = load_dataset(_config(kind, root, "data.test_split=dev", "data.on_error=skip"))
    assert len(ds) == 4 and ds.test_rows.tolist() == [2, 3]
    assert [(r.file, r.row) for r in ds.skipped] == [
        (train_name, first + 1),
        (dev_name, first + 2),
    ]
    assert "resolves outside data.root" in ds.skipped[0].reason
    assert ds.subset([0, 1]).skipped == ds.skipped  # a data.subset keeps the record


def test_emoji_dataset_has_no_skipped_rows(make_config):
    assert load_dataset(make_config()).skipped == []


def _empty(kind: str, root: Path, split: str) -> str:
    name, _, _ = _split(kind, root, split, [])
    if kind != "crisismmd":  # a TSV keeps its header
        (root / name).write_text("\n\n" if kind != "llava-json" else "[]")
    return name


def _all_bad(kind: str, root: Path, split: str) -> str:
    return _split(kind, root, split, ["img/404.png", "../img/0.png"])[0]


@pytest.mark.parametrize("spoil", [_empty, _all_bad], ids=["empty", "all_skipped"])
@pytest.mark.parametrize("split, key", [("dev", "data.test_split"), ("train", "data.root")])
@pytest.mark.parametrize("kind", KINDS)
def test_split_without_usable_rows_is_a_config_error(splits, kind, split, key, spoil):
    root = splits(kind)
    name = spoil(kind, root, split)
    with pytest.raises(ConfigError) as info:
        load_dataset(_config(kind, root, "data.test_split=dev", "data.on_error=skip"))
    assert info.value.key == key
    if kind == "crisismmd" and split == "train" and spoil is _empty:  # read for the classes
        assert "_img_train.tsv: no labelled rows to take the classes from" in str(info.value)
        return
    assert f"{root / name} has no usable rows" in str(info.value)
    if spoil is _all_bad:
        assert "all 2 skipped with data.on_error=skip" in str(info.value)


def test_empty_test_file_without_header_names_test_split(splits):
    root = splits("crisismmd")
    (root / "task_humanitarian_text_img_dev.tsv").write_text("")
    with pytest.raises(ConfigError) as info:
        load_dataset(_config("crisismmd", root, "data.test_split=dev"))
    assert info.value.key == "data.test_split" and "empty file (no header)" in str(info.value)


@pytest.mark.parametrize("kind", KINDS)
def test_missing_test_split_names_test_split(splits, kind):
    root = splits(kind)
    with pytest.raises(ConfigError) as info:
        load_dataset(_config(kind, root, "data.test_split=test"))
    assert info.value.key == "data.test_split" and "file not found" in str(info.value)


@pytest.mark.parametrize("kind", KINDS)
def test_test_split_that_is_the_train_split_is_a_config_error(splits, tmp_path, kind):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as info:  # nothing need exist: the name is enough
        load_dataset(_config(kind, tmp_path / "empty", "data.test_split=train"))
    assert info.value.key == "data.test_split"
    assert "'train' is the training split; the global test set must be held out" in str(info.value)

    root = splits(kind)
    name = next(p.name for p in root.iterdir() if p.is_file() and "train" in p.name)
    test = name.replace("train", "test")
    (root / test).symlink_to(root / name)  # test -> train under another name
    with pytest.raises(ConfigError) as info:
        load_dataset(_config(kind, root, "data.test_split=test"))
    assert info.value.key == "data.test_split"
    assert f"{root / test} is the training split ({root / name})" in str(info.value)
