"""fedsim: a Ray-distributed simulation engine for federated LoRA fine-tuning of
vision-language models under heterogeneous ranks, data and modalities.

``fedsim.run(config)`` runs one simulation and returns its per-round metrics and MLflow run id.
"""

from fedsim.errors import ConfigError
from fedsim.version import __version__ as __version__

__all__ = ["ConfigError", "FedSimConfig", "load_config", "resume", "run"]


def run(config=None, **options):
    """Run one simulation; see :func:`fedsim.simulation.run.run` (``dataset``, ``executor``)."""
    from fedsim.simulation.run import run as _run

    return _run(config, **options)


def resume(run_dir, overrides=(), **options):
    """Continue a stopped run from its latest checkpoint; see
    :func:`fedsim.simulation.run.resume`."""
    from fedsim.simulation.run import resume as _resume

    return _resume(run_dir, overrides, **options)


def __getattr__(name: str):
    # ``FedSimConfig`` and ``load_config`` import torch (through the config's registries):
    # loaded on first use, so ``fedsim run`` can start Ray before paying for it
    if name in ("FedSimConfig", "load_config"):
        from fedsim import config

        return getattr(config, name)
    raise AttributeError(f"module 'fedsim' has no attribute {name!r}")
