"""fedsim: a Ray-distributed simulation engine for federated LoRA fine-tuning of
vision-language models under heterogeneous ranks, data and modalities.

``fedsim.run(config)`` runs one simulation and returns its per-round metrics and MLflow run id;
``fedsim.load_config(path, overrides)`` builds a validated config. ``config`` may be the name
of a shipped experiment (``fedsim.run("vlm_emoji")``, see :mod:`fedsim.experiments`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from fedsim import logs
from fedsim.errors import ConfigError
from fedsim.version import __version__ as __version__

if TYPE_CHECKING:  # what the lazy names below are, for type checkers, IDEs and the docs
    from fedsim.config import FedSimConfig, load_config
    from fedsim.simulation.run import RunResult, resume, run, warm_pool

__all__ = [
    "ConfigError",
    "FedSimConfig",
    "RunResult",
    "__version__",
    "load_config",
    "resume",
    "run",
    "warm_pool",
]

# Loaded on first use, so that ``import fedsim`` (and ``fedsim run``, which starts Ray before
# anything heavy) pays for neither the config schema nor torch and Ray. Each name is the real
# object (``inspect.signature(fedsim.run)`` shows its typed parameters).
_LAZY = {
    "FedSimConfig": "fedsim.config",
    "load_config": "fedsim.config",
    "RunResult": "fedsim.simulation.run",
    "resume": "fedsim.simulation.run",
    "run": "fedsim.simulation.run",
    "warm_pool": "fedsim.simulation.run",
}

logs.install()


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'fedsim' has no attribute {name!r}")


def __dir__() -> list[str]:
    helpers = {"TYPE_CHECKING", "annotations", "importlib"}
    return sorted((set(globals()) | set(_LAZY)) - helpers)
