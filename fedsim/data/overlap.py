"""Test rows that are training rows: the same row in both splits, found by its content.

A global test set copied from the training file (or sharing rows with it) scores what the
model memorised, not what it learned. A symlink between the two files is found by the file
system; copied rows are found here by content: a row is its text and answer (its caption, or
its label) and its pixels as loaded, by digest (so two image files with the same content are
the same image). Rows that share an image and a question but not the answer (several captions
of one picture) are different rows.

Texts and answers are compared first and pixels only for the training rows whose text and
answer some test row shares, so a split pair without such rows costs one dictionary.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence

import numpy as np
import torch


def _digest(image: torch.Tensor) -> bytes:
    return hashlib.blake2b(image.numpy().tobytes(), digest_size=16).digest()


def shared_rows(
    train_images: torch.Tensor,
    train_keys: Sequence[Hashable],
    test_images: torch.Tensor,
    test_keys: Sequence[Hashable],
) -> np.ndarray:
    """The test rows whose image and key (text and answer) are those of some training row.

    Args:
        train_images: ``(N, 3, S, S)`` uint8, the training rows' pixels.
        train_keys: per training row, what makes it a row besides its image (its text and
            answer, as a tuple).
        test_images: ``(M, 3, S, S)`` uint8, the test rows' pixels.
        test_keys: the M test rows' keys.

    Returns:
        The indices (increasing) of the test rows that are also training rows.
    """
    by_key: dict[Hashable, list[int]] = {}
    for i, key in enumerate(train_keys):
        by_key.setdefault(key, []).append(i)
    seen: dict[Hashable, set[bytes]] = {}  # key -> the pixel digests of its training rows
    found = []
    for j, key in enumerate(test_keys):
        rows = by_key.get(key)
        if rows is None:
            continue
        if key not in seen:
            seen[key] = {_digest(train_images[i]) for i in rows}
        if _digest(test_images[j]) in seen[key]:
            found.append(j)
    return np.asarray(found, dtype=np.int64)
