"""The one registry of fedsim's plug-ins, and the one place each kind is built.

Every entry is a ``"module:Name"`` string, so that naming a plug-in costs no import: the config
lists and checks names with nothing but this module loaded, and a class is imported when it is
first asked for. What exists:

- ``METHODS``: the federated methods (:class:`fedsim.methods.base.Method` subclasses), in the
  order their hooks run; ``OBJECTIVES`` the ones ``objective.method`` may name;
- ``BACKBONES`` (:class:`BackboneSpec`) and ``DATASETS`` (:class:`DatasetSpec`);
- ``TASKS``: what a backbone's model does (classification or generation);
- the merge rules, server optimisers and sharing policies of :mod:`aggregation.registry`.

How each is built from a config: :func:`build_merger`, :func:`build_server_optimizer`,
:func:`enabled_methods`, :func:`task_class`, :meth:`BackboneSpec.load_builder`. Runs and tests
build them only through these. Adding a method is one module plus one line in ``METHODS``
(plus its options section in :mod:`fedsim.config.methods` where it takes any).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aggregation.registry import (
    MERGERS,
    SERVER_OPTIMIZERS,
    SHARING_POLICIES,
    get_merger,
    get_server_optimizer,
    load,
    merger_class,
    server_optimizer_class,
)

if TYPE_CHECKING:
    from aggregation.rank_merger import RankMerger
    from aggregation.server_opt import ServerOptimizer
    from fedsim.config.schema import FedSimConfig, ServerConfig
    from fedsim.methods.base import Method

__all__ = [
    "BACKBONES",
    "DATASETS",
    "MERGERS",
    "METHODS",
    "OBJECTIVES",
    "SERVER_OPTIMIZERS",
    "SHARING_POLICIES",
    "TASKS",
    "BackboneSpec",
    "DatasetSpec",
    "backbone_spec",
    "build_merger",
    "build_server_optimizer",
    "enabled_methods",
    "load",
    "merger_class",
    "method_classes",
    "server_optimizer_class",
    "task_class",
]

# The methods; each class's ``order`` says when its hooks run (see fedsim.methods.base.Method)
METHODS: dict[str, str] = {
    "sharing": "fedsim.methods.sharing:Sharing",
    "fedprox": "fedsim.methods.fedprox:FedProx",
    "fedmllm": "fedsim.methods.fedprox:FedMLLM",
    "scaffold": "fedsim.methods.scaffold:Scaffold",
    "robust": "fedsim.methods.robust:Robust",
    "privacy": "fedsim.methods.privacy:Privacy",
    "fednova": "fedsim.methods.fednova:FedNova",
    "flora": "fedsim.methods.flora:FLoRAFolding",
    "fedex": "fedsim.methods.fedex:FedEx",
    "fedplora": "fedsim.methods.fedplora:FedPLoRA",
    "editing": "fedsim.methods.editing:Editing",
    "pruning": "fedsim.methods.pruning:Pruning",
    "attack": "fedsim.methods.attack:Attack",
}
# objective.method: plain (no method), or a method whose class sets ``objective`` (a client
# objective; a test checks that the two agree)
OBJECTIVES: tuple[str, ...] = ("plain", "fedprox", "fedmllm", "scaffold", "fednova")

# what a backbone's model does -> the Task class that trains and evaluates it
TASKS: dict[str, str] = {
    "classification": "fedsim.tasks.classification:ClassificationTask",
    "generation": "fedsim.tasks.generation:GenerationTask",
}


def method_classes() -> list[type[Method]]:
    """Every registered method's class, in hook order: ascending ``Method.order``, a tie in
    registry order (imports the methods)."""
    return sorted((load(ref) for ref in METHODS.values()), key=lambda cls: cls.order)


def enabled_methods(cfg: FedSimConfig) -> list[Method]:
    """New instances of the methods ``cfg`` turns on, in hook order."""
    return [cls(cfg) for cls in method_classes() if cls.enabled(cfg)]


def build_merger(cfg: FedSimConfig) -> RankMerger:
    """The configured merge rule, given the ``aggregation.*`` options its class takes."""
    cls = merger_class(cfg.aggregation.method)
    return get_merger(cls.name, **{k: getattr(cfg.aggregation, k) for k in cls.options})


def build_server_optimizer(server: ServerConfig) -> ServerOptimizer:
    """The configured server optimiser, given the ``server.*`` options its class takes (one
    left at None takes the class's default)."""
    cls = server_optimizer_class(server.optimizer)
    values = {k: getattr(server, k) for k in cls.options}
    return get_server_optimizer(
        server.optimizer, **{k: v for k, v in values.items() if v is not None}
    )


def task_class(name: str) -> type:
    """The Task class registered under ``name``.

    Raises:
        ValueError: ``name`` is not registered; the message lists the registered tasks.
    """
    try:
        ref = TASKS[name]
    except KeyError:
        raise ValueError(
            f"task {name!r} is not registered; registered: {', '.join(TASKS)}"
        ) from None
    return load(ref)


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset.

    Attributes:
        name: the ``data.dataset`` value.
        loader: ``"module:function"`` reading one split:
            ``(root, split, image_size, on_error) -> (MultimodalDataset, LoadReport)``
            (:mod:`fedsim.data.loaders`); None for ``emoji``.
        file_of: ``"module:function"``: ``(root, split) -> Path`` of a split's file.
        default_test: the split used as the global test set unless ``data.test_split`` says.
        generative_only: its targets are free text (a generative model is needed).
        summary: one line for the README and the errors.
    """

    name: str
    loader: str | None = None
    file_of: str | None = None
    default_test: str | None = None
    generative_only: bool = False
    summary: str = ""

    @property
    def needs_root(self) -> bool:
        return self.loader is not None

    def load(self, what: str) -> Callable:
        """The function ``what`` (``"loader"`` or ``"file_of"``) names, imported."""
        return load(getattr(self, what))


_LOADERS = "fedsim.data.loaders"
DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("emoji", summary="built in: OpenMoji images + Unicode names"),
        DatasetSpec(
            "hateful_memes",
            f"{_LOADERS}:load_hateful_memes",
            f"{_LOADERS}:hateful_memes_file",
            "dev",
            summary="Hateful Memes (Kiela et al. 2020), jsonl + img/",
        ),
        DatasetSpec(
            "crisismmd",
            f"{_LOADERS}:load_crisismmd",
            f"{_LOADERS}:crisismmd_file",
            "test",
            summary="CrisisMMD humanitarian task, tsv + images",
        ),
        DatasetSpec(
            "llava",
            f"{_LOADERS}:load_llava_split",
            f"{_LOADERS}:llava_file",
            "test",
            generative_only=True,
            summary="LLaVA conversation JSON (train.json, <test_split>.json)",
        ),
    )
}


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone family.

    Attributes:
        name: the ``model.backbone`` value.
        builder: ``"module:function"`` that builds it (imported when used).
        generative: True when it answers in text (the generation task), False for a
            classifier (the classification task).
        required: ``model.*`` keys that must be set for it (named in the config error).
        hub_configs: ``model.*`` keys naming Hugging Face models whose configs the pre-flight
            check reads before any actor starts.
        summary: one line for the README and the errors.
        max_rank: the largest LoRA rank its target modules admit, where it is fixed (the
            built backbone's ``max_rank``; tested); None where it depends on the model.
    """

    name: str
    builder: str
    generative: bool
    required: tuple[str, ...] = ()
    hub_configs: tuple[str, ...] = ()
    summary: str = ""
    max_rank: int | None = None

    def load_builder(self) -> Callable:
        """The builder function, imported."""
        return load(self.builder)


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            "minilm-effnet",
            "fedsim.models.backbone:build_minilm_effnet",
            False,
            summary="pretrained MiniLM + EfficientNet-Lite0 + a fusion head (default)",
            max_rank=80,
        ),
        BackboneSpec(
            "tiny",
            "fedsim.models.backbone:build_tiny",
            False,
            summary="random-initialised tiny towers, for tests and quick checks",
            max_rank=16,
        ),
        BackboneSpec(
            "hf",
            "fedsim.models.backbone:build_hf",
            False,
            required=("text_encoder", "vision_encoder"),
            hub_configs=("text_encoder", "vision_encoder"),
            summary="any Hugging Face text and vision encoders (hub ids or local paths)",
        ),
        BackboneSpec(
            "smolvlm-effnet",
            "fedsim.models.vlm:build_generative",
            True,
            summary="the offline demo VLM: EfficientNet-Lite0 + SmolLM2-135M",
        ),
        BackboneSpec(
            "hf-vlm",
            "fedsim.models.vlm:build_generative",
            True,
            required=("name_or_path",),
            summary="any Hugging Face image-text-to-text model (LLaVA, Qwen2-VL, SmolVLM, ...)",
        ),
    )
}


def backbone_spec(name: str) -> BackboneSpec:
    """The spec of ``name``; ValueError listing the registered names otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; allowed: {', '.join(BACKBONES)}") from None
