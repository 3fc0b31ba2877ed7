"""The built-in emoji dataset: parsing emoji-test.txt, rendering, classes and the disk cache."""

from __future__ import annotations

import json

import pytest
import torch

from fedsim.data import emoji
from fedsim.data.emoji import (
    CACHE_FORMAT,
    EXCLUDED_GROUPS,
    emoji_test_file,
    load_emoji,
    parse_emoji_test,
)

IMAGE_SIZE = 16  # the size the session cache (conftest.emoji_cache) is built at

SAMPLE = """\
# group: Smileys & Emotion

# subgroup: face-smiling
1F600                                                  ; fully-qualified     # 😀 E1.0 grinning face
1F603                                                  ; fully-qualified     # 😃 E0.6 grinning face with big eyes

# subgroup: face-affection
263A FE0F                                              ; fully-qualified     # ☺️ E0.6 smiling face
263A                                                   ; unqualified         # ☺ E0.6 smiling face

# group: Component

# subgroup: skin-tone
1F3FB                                                  ; component           # 🏻 E1.0 light skin tone

# group: People & Body

# subgroup: person-gesture
1F645 200D 2642 FE0F                                   ; fully-qualified     # 🙅‍♂️ E4.0 man gesturing NO
1F645 200D 2642                                        ; minimally-qualified # 🙅‍♂ E4.0 man gesturing NO
"""  # noqa: E501


def test_parse_keeps_only_fully_qualified_entries_with_their_groups(tmp_path):
    path = tmp_path / "emoji-test.txt"
    path.write_text(SAMPLE, encoding="utf-8")
    entries = parse_emoji_test(path)
    assert [e.codepoints for e in entries] == [
        (0x1F600,),
        (0x1F603,),
        (0x263A, 0xFE0F),
        (0x1F645, 0x200D, 0x2642, 0xFE0F),
    ]
    assert [e.name for e in entries] == [
        "grinning face",
        "grinning face with big eyes",
        "smiling face",
        "man gesturing NO",
    ]
    assert [e.group for e in entries] == ["Smileys & Emotion"] * 3 + ["People & Body"]
    assert entries[2].subgroup == "face-affection"
    assert entries[3].subgroup == "person-gesture"


def test_parse_the_shipped_file_returns_exactly_its_fully_qualified_lines():
    path = emoji_test_file()
    lines = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#") and ";" in line
    ]
    qualified = [
        line for line in lines if line.split(";")[1].split("#")[0].strip() == "fully-qualified"
    ]
    assert len(qualified) < len(lines)  # the file has other statuses to skip
    entries = parse_emoji_test(path)
    assert len(entries) == len(qualified) > 3000
    expected = [tuple(int(c, 16) for c in line.split(";")[0].split()) for line in qualified]
    assert [e.codepoints for e in entries] == expected
    assert all(e.name and e.group and e.subgroup for e in entries)


@pytest.fixture(scope="module")
def dataset(emoji_cache):
    return load_emoji(IMAGE_SIZE, "group", emoji_cache)


def test_group_labels_are_the_nine_groups_without_component(dataset):
    assert len(dataset.classes) == 9
    assert not set(EXCLUDED_GROUPS) & set(dataset.classes)
    assert "Component" not in dataset.classes
    assert dataset.labels.dtype == torch.int64
    assert int(dataset.labels.min()) == 0
    assert int(dataset.labels.max()) == len(dataset.classes) - 1
    assert set(dataset.labels.tolist()) == set(range(9))  # every class is present


def test_images_are_uint8_and_none_is_blank(dataset):
    n = len(dataset)
    assert n > 3000
    assert dataset.images.shape == (n, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert dataset.images.dtype == torch.uint8
    assert len(dataset.texts) == n == len(dataset.labels)
    drawn = (dataset.images < 250).flatten(1).any(dim=1)  # some non-white pixel per image
    assert bool(drawn.all())
    assert all(isinstance(t, str) and t for t in dataset.texts)


def test_cache_is_written_once_and_reloaded(dataset, emoji_cache, monkeypatch):
    target = emoji_cache / f"emoji-v{CACHE_FORMAT}-{IMAGE_SIZE}px"
    assert (target / "meta.json").is_file()
    assert (target / "images.safetensors").is_file()
    meta = json.loads((target / "meta.json").read_text())
    assert len(meta["rows"]) == len(dataset)
    assert meta["stats"]["kept"] == len(dataset)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache should have been hit, not rebuilt")

    monkeypatch.setattr(emoji, "build_emoji", no_rebuild)
    mtime = (target / "images.safetensors").stat().st_mtime_ns
    again = load_emoji(IMAGE_SIZE, "group", emoji_cache)
    assert (target / "images.safetensors").stat().st_mtime_ns == mtime
    assert torch.equal(again.images, dataset.images)
    assert torch.equal(again.labels, dataset.labels)
    assert again.texts == dataset.texts
    assert again.classes == dataset.classes


def test_subgroup_labels_give_more_classes(dataset, emoji_cache):
    sub = load_emoji(IMAGE_SIZE, "subgroup", emoji_cache)
    assert len(sub.classes) > len(dataset.classes)
    assert len(sub) == len(dataset)
    assert torch.equal(sub.images, dataset.images)
    assert int(sub.labels.max()) == len(sub.classes) - 1


def test_bad_label_is_rejected(emoji_cache):
    with pytest.raises(ValueError, match="subgroup"):
        load_emoji(IMAGE_SIZE, "emotion", emoji_cache)


def test_subset_keeps_rows_and_classes(dataset):
    part = dataset.subset([5, 1, 3])
    assert len(part) == 3
    assert part.texts == [dataset.texts[i] for i in (5, 1, 3)]
    assert torch.equal(part.images[1], dataset.images[1])
    assert part.classes == dataset.classes
