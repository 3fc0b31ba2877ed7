"""The experiments shipped with fedsim, as package data: the default experiment, the generative
demo, the papers' settings and the studies.

They install with fedsim (a wheel, an editable install or a checkout alike), so
``fedsim run`` with no config runs the same default everywhere, and any of them can be named
without a path: ``fedsim run vlm_emoji``, ``fedsim compare compare``. A repository checkout
also keeps them under their former paths, ``experiments/<name>.yaml``.

A name is a file's stem here (``vlm_emoji`` for ``vlm_emoji.yaml``). A study (a file with
``variants:``, run by ``fedsim compare`` or ``fedsim sweep``) is told from an experiment (a
config, run by ``fedsim run``) by its keys.

Torch-free and light: the command line resolves a name before Ray starts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from fedsim.errors import ConfigError

DIRECTORY = Path(__file__).resolve().parent
DEFAULT = "default"
Kind = Literal["run", "study"]

# A study names the experiment it varies (``base:``) and its variants (``variants:``).
_STUDY_KEY = re.compile(r"^(?:variants|base)\s*:", re.MULTILINE)
_SUFFIXES = (".yaml", ".yml")
# The bytes read to tell a study from an experiment: the largest YAML file fedsim reads
# (fedsim.config.yaml_file.MAX_BYTES), and one more.
_SNIFF_BYTES = (1 << 20) + 1


def is_study(path: str | Path) -> bool:
    """Whether the YAML file ``path`` is a study (it has a top-level ``variants:`` or ``base:``);
    an unreadable file is not (the loader names its problem)."""
    try:
        with Path(path).open("rb") as f:  # the head: a file this large is refused when read
            head = f.read(_SNIFF_BYTES)
        return _STUDY_KEY.search(head.decode("utf-8", errors="ignore")) is not None
    except OSError:
        return False


def names(kind: Kind | None = None) -> list[str]:
    """The shipped experiments' names, sorted: ``run`` the experiments (configs), ``study`` the
    studies, None both."""
    found = []
    for path in sorted(DIRECTORY.glob("*.yaml")):
        if kind is None or is_study(path) == (kind == "study"):
            found.append(path.stem)
    return found


def default_path() -> Path:
    """The default experiment's file (what ``fedsim run`` runs without a config)."""
    return DIRECTORY / f"{DEFAULT}.yaml"


def shipped(name: str) -> Path | None:
    """The file of the shipped experiment ``name`` (``vlm_emoji`` or ``vlm_emoji.yaml``), or
    None when no shipped experiment has that name."""
    if not name or "/" in name or os.sep in name:
        return None
    stem = name
    for suffix in _SUFFIXES:
        stem = stem.removesuffix(suffix)
    path = DIRECTORY / f"{stem}.yaml"
    return path if stem and not stem.startswith((".", "_")) and path.is_file() else None


def find(ref: str | Path, kind: Kind = "run") -> Path:
    """The YAML file ``ref`` means: a file, as given; else a shipped experiment of that name.

    A file of the working directory wins over a shipped experiment of the same name.

    Args:
        ref: a path to a YAML file, or the name of a shipped experiment.
        kind: what the caller runs: ``run`` (an experiment) or ``study``.

    Raises:
        ConfigError: neither a file nor a shipped name (the message lists the names of that
            kind), a directory, a study given where an experiment is run, or a shipped
            experiment named where a study is run.
    """
    key = "config" if kind == "run" else "study"
    path, by_name = Path(ref), False
    if not path.is_file():
        if path.is_dir():
            raise ConfigError(key, f"{ref} is a directory, not a YAML file")
        if path.exists():
            raise ConfigError(key, f"{ref} is not a regular file (a device or pipe?)")
        found = shipped(str(ref))
        if found is None:
            known = ", ".join(names(kind))
            text = str(ref)
            if "/" in text or os.sep in text or text.endswith(_SUFFIXES):
                raise ConfigError(
                    key, f"file not found: {ref} (or name a shipped {_noun(kind)}: {known})"
                )
            raise ConfigError(
                key,
                f"unknown {_noun(kind)} {text!r}: no such file, and no shipped {_noun(kind)} "
                f"has that name; known: {known}",
            )
        path, by_name = found, True
    # a config never has a study's keys; a study file of the user's reports its own problems
    if is_study(path) if kind == "run" else by_name and not is_study(path):
        command = "fedsim compare" if kind == "run" else "fedsim run"
        raise ConfigError(
            key,
            f"{ref} is {'a study' if kind == 'run' else 'an experiment, not a study'}: "
            f"run it with `{command} {ref}`",
        )
    return path


def _noun(kind: Kind) -> str:
    return "experiment" if kind == "run" else "study"
