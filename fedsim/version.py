"""fedsim's version, in one place (``setup.cfg`` reads it; runs and registered models record it),
and the git commit of the code when it runs from a checkout."""

from __future__ import annotations

import functools
import os
import re
import subprocess
from pathlib import Path

__version__ = "0.1.0"

# The directory that holds the ``fedsim`` package: a checkout's root, or site-packages.
_ROOT = Path(__file__).resolve().parent.parent
_SHA = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")


@functools.lru_cache(maxsize=1)
def source_commit() -> tuple[str, bool] | None:
    """``(commit, dirty)`` of the git checkout this fedsim runs from, or None.

    Only a checkout whose root holds this very ``fedsim`` package counts (an editable install
    or the repository itself), never a wheel installed in a virtual environment that happens
    to lie inside some other repository. ``dirty``: tracked files differ from the commit.
    None without a checkout, without ``git`` or when git fails: never an error.
    """
    if not (_ROOT / ".git").exists():
        return None
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    try:
        head = subprocess.run(
            ["git", "-C", str(_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
            check=True,
        ).stdout.strip()
        if not _SHA.fullmatch(head):
            return None
        status = subprocess.run(
            ["git", "-C", str(_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return head, bool(status.strip())
