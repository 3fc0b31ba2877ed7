"""Rows that fit a generative model's context, and what happens to those that do not.

A training sequence is the prompt (chat template, image tokens and the row's text, cut to
``data.max_text_tokens``) followed by the answer and an end token. A row whose sequence is
longer than the model's context (``max_position_embeddings``) cannot be trained on as it is:
positions past the context are undefined, and a long answer is a memory bill (a 1 MB answer
is some 270,000 tokens; their logits alone take tens of GB). Such a row is a bad row, like a
missing image: it stops the run naming its file and row, or with ``data.on_error=skip`` it is
left out, counted in the warning and in ``data/skipped_rows``.

It is not truncated: a cut answer ending in the end token would teach the model to stop
mid-sentence, and a cut reference would change the scores without saying so.

Counting every row's tokens would cost a tokenizer pass over the dataset; a row is counted
only when a cheap bound says it might not fit: no token spans less than one UTF-8 byte, so a
text of ``n`` bytes is at most ``n`` tokens (plus a small margin for tokenizers that prefix a
word marker). Rows under the bound, nearly all in practice, are never tokenized; a row over it
is encoded exactly as training would encode it. The driver and every worker run this with the
same model files and reach the same rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedsim.config import ConfigError, FedSimConfig, is_generative
from fedsim.data.emoji import MultimodalDataset
from fedsim.data.loaders import SkippedRow
from fedsim.models.vlm import IGNORE, ChatCodec, Sample
from fedsim.tasks.generation import answers_of, prompt_for

_log = logging.getLogger(__name__)
# tokens a tokenizer may add to a text beyond its byte count (a leading word marker) and that
# re-encoding a text cut at data.max_text_tokens may add at the cut
_MARGIN = 4


@dataclass
class Budget:
    """A model's context and what a prompt spends of it besides its text.

    Attributes:
        context: the context in tokens.
        overhead: at least the tokens of a prompt with the row's image and no text.
        codec: the model's codec, built on first call (the exact count of a row needs it).
        key: the config key named when a row of a dataset without files does not fit.
    """

    context: int
    overhead: int
    codec: Callable[[], ChatCodec]
    key: str


def fit_rows(
    cfg: FedSimConfig, dataset: MultimodalDataset, codec: ChatCodec | None = None
) -> MultimodalDataset:
    """``dataset`` without the rows longer than the model's context (see the module docstring).

    A no-op for a classifier (its texts are cut to ``data.max_text_tokens`` by its tokenizer)
    and for a model whose config states no context.

    Args:
        cfg: the run's config.
        dataset: the loaded dataset (:func:`fedsim.data.federated.load_dataset`).
        codec: the model's codec where it is at hand (a worker's backbone, the pre-flight's
            processor); else built when a row needs counting.

    Returns:
        ``dataset`` itself when every row fits; else (``data.on_error=skip``) a new dataset
        without the rows that do not, each recorded in its ``skipped``.

    Raises:
        ConfigError: a row does not fit and ``data.on_error=raise`` (naming its file and row,
            under ``data.root``); or no test or no training row is left.
    """
    if not is_generative(cfg) or len(dataset) == 0:
        return dataset
    budget = _budget(cfg, dataset, codec)
    if budget is None:
        return dataset
    too_long = _too_long(cfg, dataset, budget)
    if not too_long:
        return dataset
    key = "data.root" if dataset.origins is not None else budget.key
    if cfg.data.on_error == "raise":
        row, reason = too_long[0]
        more = f" ({len(too_long)} rows do not fit)" if len(too_long) > 1 else ""
        raise ConfigError(
            key,
            f"{dataset.where(row)}: {reason}{more}; shorten it, or leave such rows out with "
            "data.on_error=skip",
        )
    return _without(dataset, too_long)


def _budget(cfg: FedSimConfig, dataset, codec: ChatCodec | None) -> Budget | None:
    from fedsim.models.vlm import demo_codec, hf_codec
    from fedsim.models.vlm_check import model_context, prompt_overhead

    context = model_context(cfg.model)
    if context is None:
        return None
    hf = cfg.model.backbone == "hf-vlm"
    built: list[ChatCodec] = [codec] if codec is not None else []

    def get() -> ChatCodec:
        if not built:
            built.append(hf_codec(cfg.model.name_or_path) if hf else demo_codec())
        return built[0]

    if hf:
        get()  # a processor loads in milliseconds; its count is exact
    overhead = prompt_overhead(cfg.model, dataset.images[0], built[0] if built else None)
    return Budget(context, overhead, get, "model.name_or_path" if hf else "model.backbone")


def _too_long(cfg: FedSimConfig, dataset: MultimodalDataset, budget: Budget) -> list:
    """``(row, reason)`` per row whose training sequence is longer than the context."""
    d = cfg.data
    prompt = prompt_for(d, dataset.classes)
    # the prompt's words around a one-byte text (or the placeholder of a missing one), the
    # longest modality phrase included; + 1 for the end token
    frame = max(len(prompt("x", i, t).encode()) for i in (True, False) for t in (True, False))
    fixed = budget.overhead + frame + 1 + 2 * _MARGIN
    out = []
    for row, (text, answer) in enumerate(zip(dataset.texts, answers_of(d, dataset))):
        text_bound = min(len(text.encode()), d.max_text_tokens)
        if fixed + text_bound + len(answer.encode()) <= budget.context:
            continue
        length, answer_len = _exact(cfg, budget.codec(), prompt, dataset, row, answer)
        if length > budget.context:
            reason = (
                f"its conversation is {length:,} tokens (the answer and its end token "
                f"{answer_len:,}), longer than the model's context of {budget.context:,} tokens"
            )
            out.append((row, reason))
    return out


def _exact(cfg, codec: ChatCodec, prompt, dataset, row: int, answer: str) -> tuple[int, int]:
    """The row's training sequence length and its answer's, encoded as training does."""
    text = prompt(codec.truncate(dataset.texts[row], cfg.data.max_text_tokens), True, True)
    batch = codec.encode_train([Sample(dataset.images[row], text, answer)])
    # the labels cover the answer and its end token
    return int(batch["attention_mask"].sum()), int((batch["labels"] != IGNORE).sum())


def _without(dataset: MultimodalDataset, too_long: list) -> MultimodalDataset:
    drop = {row for row, _ in too_long}
    kept = dataset.subset(np.array([r for r in range(len(dataset)) if r not in drop]))
    for row, reason in too_long:
        if dataset.origins is not None:
            name, _, number = dataset.origins[row]
        else:
            name, number = "dataset", row + 1
        kept.skipped.append(SkippedRow(name, number, reason))
    _log.warning(
        "skipped %d of %d rows longer than the model's context (data.on_error=skip; the first: %s)",
        len(too_long),
        len(dataset),
        dataset.where(too_long[0][0]),
    )
    if dataset.test_rows is not None and len(kept.test_rows) == 0:
        raise ConfigError("data.test_split", "no test row fits the model's context")
    if dataset.test_rows is not None and len(kept) == len(kept.test_rows):
        raise ConfigError("data.root", "no training row fits the model's context")
    return kept
