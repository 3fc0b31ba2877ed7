"""Typed experiment configuration: defaults, then a YAML file, then dotlist overrides.

- :mod:`fedsim.config.schema`: the sections, one dataclass each, every field with help text
  (:mod:`fedsim.config.methods`: the sections of the methods that take options);
- :mod:`fedsim.config.loading`: :func:`load_config`, :func:`as_config`, :func:`to_yaml`,
  :func:`tracking_uri` (the one rule for the MLflow store: config > environment > default);
- :mod:`fedsim.config.checks`: :func:`validate`, the engine's rules (each method's own rules
  live in its module of :mod:`fedsim.methods` and are found through the registry);
- :mod:`fedsim.config.strict`: the values as written, read strictly (numbers in ASCII digits,
  booleans that are booleans) before OmegaConf converts them;
- :mod:`fedsim.config.limits`: how large a value may be, bounded by what the arithmetic
  downstream can carry (float32 weights, the privacy accountant, simulated time);
- :mod:`fedsim.config.ranks`: ``clients.ranks`` and :func:`resolve_ranks`;
- :mod:`fedsim.config.registry`: every plug-in by ``"module:Name"``, and how each is built;
- :mod:`fedsim.config.yaml_file`: every YAML file read for the user (configs, studies), within
  limits of size, alias expansion and nesting;
- :mod:`fedsim.config.arguments`: type checks of the Python API's arguments, naming the
  argument.

This package imports nothing of fedsim but :mod:`fedsim.errors`, :mod:`fedsim.experiments` (the
shipped experiments' names) and the torch-free :mod:`aggregation.registry`: reading, checking
names of and writing a config loads no torch and no method (the methods' rules are imported
when :func:`validate` runs them).

Every rule raises :class:`ConfigError` naming the key and what is allowed.
"""

from fedsim.config.checks import MAX_CLIENTS, MAX_ROUNDS, MAX_SEED, is_generative, validate
from fedsim.config.loading import (
    DEFAULT_TRACKING_URI,
    as_config,
    config_digest,
    flatten,
    load_config,
    to_yaml,
    tracking_uri,
)
from fedsim.config.methods import (
    EditingConfig,
    FedExConfig,
    FedPLoRAConfig,
    PrivacyConfig,
    PruningConfig,
    RobustConfig,
)
from fedsim.config.ranks import FEDILORA_RANKS, rank_spec, resolve_ranks
from fedsim.config.schema import (
    BACKBONES,
    GENERATIVE_BACKBONES,
    AggregationConfig,
    CheckpointConfig,
    ClientResources,
    ClientsConfig,
    DataConfig,
    DeviceProfile,
    DevicesConfig,
    EvalConfig,
    FaultsConfig,
    FedSimConfig,
    LoraConfig,
    ModelConfig,
    ObjectiveConfig,
    ResourcesConfig,
    RoundConfig,
    ServerConfig,
    SharingConfig,
    TrackingConfig,
    TrainConfig,
)
from fedsim.errors import ConfigError

__all__ = [
    "BACKBONES",
    "DEFAULT_TRACKING_URI",
    "FEDILORA_RANKS",
    "GENERATIVE_BACKBONES",
    "MAX_CLIENTS",
    "MAX_ROUNDS",
    "MAX_SEED",
    "AggregationConfig",
    "CheckpointConfig",
    "ClientResources",
    "ClientsConfig",
    "ConfigError",
    "DataConfig",
    "DeviceProfile",
    "DevicesConfig",
    "EditingConfig",
    "EvalConfig",
    "FaultsConfig",
    "FedExConfig",
    "FedPLoRAConfig",
    "FedSimConfig",
    "PrivacyConfig",
    "RobustConfig",
    "LoraConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "PruningConfig",
    "ResourcesConfig",
    "RoundConfig",
    "ServerConfig",
    "SharingConfig",
    "TrackingConfig",
    "TrainConfig",
    "as_config",
    "config_digest",
    "flatten",
    "is_generative",
    "load_config",
    "rank_spec",
    "resolve_ranks",
    "to_yaml",
    "tracking_uri",
    "validate",
]
