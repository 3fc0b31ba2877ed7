"""Loaders for benchmark datasets as they ship on disk: Hateful Memes, CrisisMMD, LLaVA JSON.

Each loader reads one split into memory and returns it with a :class:`LoadReport`. A row that
cannot be used (bad JSON, a missing field, a wrong column count, a missing or unreadable image,
a bad label, an image path that resolves outside the dataset root, JSON nested too deeply to
parse, a string with a lone surrogate) raises :class:`DataError` naming the file, the 1-based
row and the problem, or, with ``on_error="skip"``, is left out and listed in the report. Blank
lines are not rows.

A lone surrogate (``"\\ud800"`` in JSON) parses into a Python string that is not text: it has
no UTF-8 encoding, so no tokenizer can encode it (and no log or MLflow table can hold it). It
is refused where the row is read, not where a worker first tokenizes it.

Image paths are confined to the root they are relative to: an absolute path, a ``..`` escape
or a symlink to a file outside it is a bad row, checked before the file is opened, so a row
cannot make the loader read (or reveal the existence of) a file elsewhere on the machine.

Images are converted to RGB (transparency composited onto white), centre-cropped to a square
and resized to ``image_size`` with LANCZOS: cropping keeps the scale of the content and fills
every pixel, where padding would spend part of a small image on borders.
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps

from fedsim.data.emoji import MultimodalDataset

ON_ERROR = ("raise", "skip")
# The first release ships train/dev/test; the final one adds the seen/unseen dev and test sets.
HATEFUL_MEMES_SPLITS = (
    "train",
    "dev",
    "test",
    "dev_seen",
    "dev_unseen",
    "test_seen",
    "test_unseen",
)
HATEFUL_MEMES_CLASSES = ["not_hateful", "hateful"]
CRISISMMD_SPLITS = ("train", "dev", "test")
CRISISMMD_COLUMNS = ("image", "tweet_text", "label")
# Label of a Hateful Memes test row shipped without one (test.jsonl of the first release).
UNLABELED = -1

T = TypeVar("T")


class DataError(ValueError):
    """A dataset file or one of its rows cannot be used; the message says where and why.

    Attributes:
        file: name of the file at fault (a full path for a missing file).
        row: 1-based line (or JSON list item) number, or None for the whole file.
        reason: the problem, without the location.
    """

    def __init__(self, file: str, row: int | None, reason: str, unit: str = "line"):
        where = file if row is None else f"{file} {unit} {row}"
        super().__init__(f"{where}: {reason}")
        self.file = file
        self.row = row
        self.reason = reason


class SkippedRow(NamedTuple):
    """A row left out by ``on_error="skip"``."""

    file: str
    row: int
    reason: str


@dataclass
class LoadReport:
    """What a loader read: rows seen, kept and skipped, and why each skipped row was.

    Attributes:
        rows: data rows read (header and blank lines excluded).
        kept: rows in the returned dataset.
        skipped: rows left out (always 0 with ``on_error="raise"``).
        skipped_rows: ``(file, row_number, reason)`` per skipped row, in file order.
        kept_rows: the 1-based row number of each kept row, in dataset order (so a later check
            of a row can name it as the loader would).
        unit: what a row number counts: ``line`` or (a JSON list) ``item``.
    """

    rows: int = 0
    kept: int = 0
    skipped: int = 0
    skipped_rows: list[SkippedRow] = field(default_factory=list)
    kept_rows: list[int] = field(default_factory=list)
    unit: str = "line"


@dataclass
class CaptionDataset:
    """Images with an instruction and the reference answer, held in memory.

    Attributes:
        images: ``(N, 3, S, S)`` uint8.
        prompts: N instructions (the human turn without its ``<image>`` token).
        targets: N reference answers (the first gpt turn).
        image_paths: N image paths as the records give them.
    """

    images: torch.Tensor
    prompts: list[str]
    targets: list[str]
    image_paths: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, index: np.ndarray) -> CaptionDataset:
        """Rows ``index`` as a new dataset."""
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        rows = idx.tolist()
        return CaptionDataset(
            self.images[idx],
            [self.prompts[i] for i in rows],
            [self.targets[i] for i in rows],
            [self.image_paths[i] for i in rows] if self.image_paths else [],
        )


class _BadRow(Exception):
    """One row cannot be used; the collector turns it into a DataError or a skip."""


def load_hateful_memes(
    root: str | Path, split: str, image_size: int, on_error: str = "raise"
) -> tuple[MultimodalDataset, LoadReport]:
    """Load one split of Hateful Memes (``<split>.jsonl`` with ``img``, ``text``, ``label``).

    Args:
        root: the dataset directory; ``img`` paths are relative to it.
        split: one of :data:`HATEFUL_MEMES_SPLITS`. Test splits may lack labels: such rows get
            :data:`UNLABELED`; every other split requires a label of 0 or 1.
        image_size: side of the square images returned.
        on_error: ``raise`` on the first bad row, or ``skip`` it and count it in the report.

    Returns:
        The dataset (classes ``not_hateful``, ``hateful``) and the load report.

    Raises:
        ValueError: unknown ``split`` or ``on_error``, or ``image_size`` below 1.
        DataError: the split file is missing, or a row is bad and ``on_error="raise"``.
    """
    _check_args(split, HATEFUL_MEMES_SPLITS, on_error, image_size)
    root = Path(root)
    path = _existing(hateful_memes_file(root, split))
    needs_label = not split.startswith("test")

    def parse(line: bytes) -> tuple[np.ndarray, str, int]:
        obj = _json_object(line)
        rel = _field(obj, "img", str)
        text = _field(obj, "text", str)
        if "label" in obj:
            label = obj["label"]
            if type(label) is not int or label not in (0, 1):
                raise _BadRow(f"bad label {reprlib.repr(label)} (expected 0 or 1)")
        elif needs_label:
            raise _BadRow("missing field 'label'")
        else:
            label = UNLABELED
        return _read_image(root, rel, image_size), text, label

    rows, report = _collect(path.name, "line", _lines(path), parse, on_error)
    return _multimodal(rows, HATEFUL_MEMES_CLASSES, image_size), report


def load_crisismmd(
    root: str | Path, split: str, image_size: int, on_error: str = "raise"
) -> tuple[MultimodalDataset, LoadReport]:
    """Load one split of the CrisisMMD v2 humanitarian task (``task_humanitarian_text_img_*``).

    The TSV needs a header with ``image`` (path relative to ``root``), ``tweet_text`` and
    ``label`` columns. Fields are split on tabs only: quotes in tweets are kept as written.
    The classes are the sorted distinct labels of the well-formed rows of the train split, so
    every split maps labels alike; a label outside them is a bad label.

    Args:
        root: the dataset directory (``CrisisMMD_v2.0``).
        split: one of :data:`CRISISMMD_SPLITS`.
        image_size: side of the square images returned.
        on_error: ``raise`` on the first bad row, or ``skip`` it and count it in the report.

    Returns:
        The dataset (texts are the tweets) and the load report.

    Raises:
        ValueError: unknown ``split`` or ``on_error``, or ``image_size`` below 1.
        DataError: the split or the train file is missing, a header lacks a column, the train
            file has no well-formed labelled row, or a row is bad and ``on_error="raise"``.
    """
    _check_args(split, CRISISMMD_SPLITS, on_error, image_size)
    root = Path(root)
    path = _existing(crisismmd_file(root, split))
    train = _existing(crisismmd_file(root, "train"))
    classes = _crisismmd_classes(train)
    if not classes:  # else every row of every split would be a bad label, blaming the wrong file
        raise DataError(train.name, None, "no labelled rows to take the classes from")
    index = {c: i for i, c in enumerate(classes)}
    header, lines = _tsv(path)
    col = {name: header.index(name) for name in CRISISMMD_COLUMNS}

    def parse(line: bytes) -> tuple[np.ndarray, str, int]:
        fields = _decode(line).split("\t")
        if len(fields) != len(header):
            raise _BadRow(f"expected {len(header)} columns, got {len(fields)}")
        rel, text, label = (fields[col[name]] for name in CRISISMMD_COLUMNS)
        if not rel.strip():
            raise _BadRow("empty field 'image'")
        if label.strip() not in index:
            raise _BadRow(f"bad label {label!r} (not a label of the train split)")
        return _read_image(root, rel.strip(), image_size), text, index[label.strip()]

    rows, report = _collect(path.name, "line", lines, parse, on_error)
    return _multimodal(rows, classes, image_size), report


def load_llava(
    path: str | Path,
    image_size: int,
    on_error: str = "raise",
    image_root: str | Path | None = None,
) -> tuple[CaptionDataset, LoadReport]:
    """Load LLaVA-style conversations (a JSON list, or JSONL) as image, prompt and target.

    Each record needs ``image`` (a path) and ``conversations``, a list of ``{"from": ...,
    "value": ...}`` turns with at least one ``human`` and one ``gpt`` turn, and at most one
    ``<image>`` token (one image per record). The prompt is the first human turn without
    ``<image>``, stripped; the target is the first gpt turn (later turns are not used). A
    ``.jsonl`` file, or any file not starting with ``[``, is read as one record per line;
    rows of a JSON list are numbered by item.

    Args:
        path: the JSON or JSONL file.
        image_size: side of the square images returned.
        on_error: ``raise`` on the first bad record, or ``skip`` it and count it in the report.
        image_root: directory the ``image`` paths are relative to; default the file's own.

    Returns:
        The dataset and the load report.

    Raises:
        ValueError: unknown ``on_error``, or ``image_size`` below 1.
        DataError: the file is missing, a JSON list file is not valid JSON or is nested too
            deeply to parse (nothing of it can be kept), or a record is bad and
            ``on_error="raise"``.
    """
    _check_args(None, (), on_error, image_size)
    path = _existing(Path(path))
    root = Path(image_root) if image_root is not None else path.parent

    def parse(record: Any) -> tuple[np.ndarray, str, str, str]:
        obj = _json_object(record) if isinstance(record, bytes) else record
        if not isinstance(obj, dict):
            raise _BadRow(f"expected a JSON object, got {type(obj).__name__}")
        rel = _field(obj, "image", str)
        turns = _field(obj, "conversations", list)
        first: dict[str, str] = {}
        for k, turn in enumerate(turns, start=1):
            if not (isinstance(turn, dict) and isinstance(turn.get("from"), str)):
                raise _BadRow(f"conversation turn {k} has no 'from'")
            if not isinstance(turn.get("value"), str):
                raise _BadRow(f"conversation turn {k} has no string 'value'")
            _check_text(turn["value"], f"conversation turn {k}")
            first.setdefault(turn["from"], turn["value"])
        for speaker in ("human", "gpt"):
            if speaker not in first:
                raise _BadRow(f"no {speaker!r} turn in 'conversations'")
        tokens = sum(t["value"].count("<image>") for t in turns)
        if tokens > 1:
            raise _BadRow(f"{tokens} <image> tokens in 'conversations' for 1 image")
        if not first["gpt"].strip():
            raise _BadRow("the first 'gpt' turn is empty")
        prompt = first["human"].replace("<image>", "").strip()
        return _read_image(root, rel, image_size), prompt, first["gpt"].strip(), rel

    if _is_json_list(path):
        unit, records = "item", enumerate(_json_list(path), start=1)
    else:
        unit, records = "line", _lines(path)
    rows, report = _collect(path.name, unit, records, parse, on_error)
    images = _stack([r[0] for r in rows], image_size)
    caps = CaptionDataset(images, [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])
    return caps, report


LLAVA_CLASSES = ["caption"]


def load_llava_split(
    root: str | Path, split: str, image_size: int, on_error: str = "raise"
) -> tuple[MultimodalDataset, LoadReport]:
    """One split of a LLaVA conversation dataset laid out as ``root/<split>.json`` (or
    ``.jsonl``), image paths relative to ``root``, as rows of a generative task.

    The row's text is the prompt, its target the answer; every row has label 0 (the Dirichlet
    split over one label is a seeded split of the rows' quantities). A split with no usable
    record comes back empty, as with the other loaders; the caller decides whether that is fatal.

    Raises:
        DataError: no ``<split>.json``/``.jsonl`` under ``root``, or a bad record with
            ``on_error="raise"`` (the message names the file and the item or line).
    """
    root = Path(root)
    path = llava_file(root, split)
    if not path.is_file():
        raise DataError(str(path), None, f"file not found (nor {split}.jsonl)")
    caps, report = load_llava(path, image_size, on_error, image_root=root)
    labels = torch.zeros(len(caps), dtype=torch.long)
    data = MultimodalDataset(
        caps.images,
        caps.prompts,
        labels,
        list(LLAVA_CLASSES),
        targets=caps.targets,
        refs=caps.image_paths,
    )
    return data, report


def hateful_memes_file(root: str | Path, split: str) -> Path:
    """The file :func:`load_hateful_memes` reads for ``split``: ``root/<split>.jsonl``."""
    return Path(root) / f"{split}.jsonl"


def crisismmd_file(root: str | Path, split: str) -> Path:
    """The file :func:`load_crisismmd` reads for ``split``."""
    return Path(root) / f"task_humanitarian_text_img_{split}.tsv"


def llava_file(root: str | Path, split: str) -> Path:
    """The file :func:`load_llava_split` reads: ``root/<split>.jsonl`` if it exists and
    ``root/<split>.json`` does not, else ``root/<split>.json`` (which may not exist)."""
    json_path, jsonl_path = Path(root) / f"{split}.json", Path(root) / f"{split}.jsonl"
    return jsonl_path if not json_path.is_file() and jsonl_path.is_file() else json_path


def _check_args(split: str | None, splits: tuple[str, ...], on_error: str, image_size: int) -> None:
    if split is not None and split not in splits:
        raise ValueError(f"split must be one of {', '.join(splits)}; got {split!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}; got {on_error!r}")
    if image_size < 1:
        raise ValueError(f"image_size must be at least 1, got {image_size}")


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise DataError(str(path), None, "file not found")
    return path


def _collect(
    name: str,
    unit: str,
    records: Iterable[tuple[int, Any]],
    parse: Callable[[Any], T],
    on_error: str,
) -> tuple[list[T], LoadReport]:
    """Parse every record, raising or skipping (and reporting) the bad ones."""
    report = LoadReport(unit=unit)
    kept: list[T] = []
    for row, record in records:
        report.rows += 1
        try:
            kept.append(parse(record))
            report.kept_rows.append(row)
        except _BadRow as err:
            if on_error == "raise":
                raise DataError(name, row, str(err), unit) from err.__cause__
            report.skipped_rows.append(SkippedRow(name, row, str(err)))
    report.kept, report.skipped = len(kept), len(report.skipped_rows)
    return kept, report


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines with their 1-based numbers.

    Read as bytes and split on ``\\n`` only: a bad byte then spoils one row, not the file, and
    ``\\r`` or U+2028 inside a tweet does not end a line.
    """
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip(b"\r\n")
            if number == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte-order mark
            if line.strip():
                yield number, line


def _decode(line: bytes) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _BadRow(f"not valid UTF-8 ({err.reason} at byte {err.start})") from err


def _json_object(line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(_decode(line))
    except json.JSONDecodeError as err:
        raise _BadRow(f"bad JSON ({err.msg} at column {err.colno})") from err
    except RecursionError as err:
        raise _BadRow("bad JSON (nested too deeply to parse)") from err
    except ValueError as err:  # e.g. an integer over Python's 4300-digit conversion limit
        raise _BadRow(f"bad JSON ({err})") from err
    if not isinstance(obj, dict):
        raise _BadRow(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _field(obj: dict[str, Any], key: str, kind: type[T]) -> T:
    if key not in obj:
        raise _BadRow(f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind):
        raise _BadRow(f"field {key!r} must be {kind.__name__}, got {type(value).__name__}")
    if isinstance(value, str):
        _check_text(value, f"field {key!r}")
    return value


def _check_text(value: str, what: str) -> None:
    """A bad row if ``value`` holds a lone surrogate (see the module docstring)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(value[err.start])
        raise _BadRow(
            f"{what} holds a lone surrogate (U+{code:04X} at character {err.start + 1}), "
            "which is not text: no tokenizer can encode it"
        ) from None


def _is_json_list(path: Path) -> bool:
    if path.suffix == ".jsonl":
        return False
    with path.open("rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    return head.startswith(b"[")


def _json_list(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as err:
        raise DataError(path.name, None, f"not valid UTF-8 ({err.reason})") from err
    except json.JSONDecodeError as err:
        raise DataError(path.name, err.lineno, f"bad JSON ({err.msg})") from err
    except RecursionError as err:
        raise DataError(path.name, None, "bad JSON (nested too deeply to parse)") from err
    except ValueError as err:  # e.g. an integer over Python's 4300-digit conversion limit
        raise DataError(path.name, None, f"bad JSON ({err})") from err
    if not isinstance(data, list):
        raise DataError(path.name, None, f"expected a JSON list, got {type(data).__name__}")
    return data


def _tsv(path: Path) -> tuple[list[str], Iterator[tuple[int, bytes]]]:
    """The header fields and an iterator over the data lines after it."""
    lines = _lines(path)
    first = next(lines, None)
    if first is None:
        raise DataError(path.name, None, "empty file (no header)")
    number, line = first
    try:
        header = [h.strip() for h in _decode(line).split("\t")]
    except _BadRow as err:
        raise DataError(path.name, number, str(err)) from err.__cause__
    missing = [c for c in CRISISMMD_COLUMNS if c not in header]
    if missing:
        raise DataError(path.name, number, f"header lacks column(s) {', '.join(missing)}")
    return header, lines


def _crisismmd_classes(train: Path) -> list[str]:
    header, lines = _tsv(train)
    col = header.index("label")
    labels = set()
    for _, line in lines:
        try:
            fields = _decode(line).split("\t")
        except _BadRow:
            continue  # reported when the train split itself is loaded
        if len(fields) == len(header) and fields[col].strip():
            labels.add(fields[col].strip())
    return sorted(labels)


def _read_image(root: Path, rel: str, size: int) -> np.ndarray:
    """The image at ``root / rel`` as ``(size, size, 3)`` uint8, centre-cropped to square.

    The path must resolve (symlinks followed) inside ``root``; this is checked before the file
    is touched, so a row cannot read, or probe for, a file outside the dataset.
    """
    path = _inside(root, rel)
    if not path.is_file():
        raise _BadRow(f"image {rel} not found under {root}")
    try:
        with Image.open(path) as im:
            rgb = _to_rgb(im)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise _BadRow(f"image {rel} unreadable ({err})") from err
    return np.asarray(ImageOps.fit(rgb, (size, size), method=Image.Resampling.LANCZOS))


def _inside(root: Path, rel: str) -> Path:
    """``root / rel`` resolved, or a bad row if it is not under ``root`` (also resolved)."""
    try:
        path = (root / rel).resolve()
        base = root.resolve()
    except (OSError, RuntimeError, ValueError) as err:  # a symlink loop, a NUL byte in rel
        raise _BadRow(f"image path {rel!r} cannot be resolved ({err})") from err
    if not path.is_relative_to(base):
        raise _BadRow(f"image path {rel!r} resolves outside data.root ({root})")
    return path


def _to_rgb(im: Image.Image) -> Image.Image:
    # A plain convert("RGB") keeps whatever colour sits under transparent pixels (often black).
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        return white.convert("RGB")
    return im.convert("RGB")


def _stack(images: list[np.ndarray], size: int) -> torch.Tensor:
    if not images:
        return torch.empty((0, 3, size, size), dtype=torch.uint8)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)


def _multimodal(
    rows: list[tuple[np.ndarray, str, int]], classes: list[str], size: int
) -> MultimodalDataset:
    images = _stack([r[0] for r in rows], size)
    labels = torch.tensor([r[2] for r in rows], dtype=torch.long)
    return MultimodalDataset(images, [r[1] for r in rows], labels, list(classes))
