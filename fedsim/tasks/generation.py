"""The generation task: a vision-language model answers in text.

Each row becomes a conversation: the user turn holds the image (or a zero image, or none, by
``data.image_fill``) and an instruction with the row's text (a hint, a meme's text, a LLaVA
prompt; a missing text follows ``data.text_fill``); the assistant turn is the reference answer.
A conversation dataset's instruction (LLaVA) reaches the model as its data wrote it; the
datasets fedsim poses as instruction following end with a phrase naming the modalities a
sample has (``data.prompt_style``).
Training takes the language-modelling loss on the assistant's tokens only. Evaluation decodes
greedily (deterministic) and scores the outputs with BLEU-4, ROUGE-L, CIDEr and exact match
(:mod:`fedsim.tasks.text_metrics`). A classification dataset is posed as instruction following: the
prompt names the classes, the answer is the class name; accuracy and macro-F1 score the
generated answer and AUC scores the answers' likelihoods.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fedsim.data.federated import Split
from fedsim.models.vlm import IGNORE, Sample
from fedsim.tasks.text_metrics import generation_metrics, normalize_answer, sample_metrics
from fedsim.tasks.training import autocast

# Per dataset: the instruction and the name of the row's text in the prompt. A None instruction
# means the row's text is the instruction itself (LLaVA conversations).
_PROMPTS = {
    ("emoji", "caption"): ("What is the name of this emoji?", "Hint"),
    ("emoji", "label"): ("Which group does this emoji belong to?", "Name"),
    ("hateful_memes", "label"): ("Is this meme hateful?", "Text"),
    ("crisismmd", "label"): ("Which humanitarian category does this tweet belong to?", "Text"),
    ("llava", "caption"): (None, "Text"),
}
# FedMLLM's modality-agnostic prompt: one neutral suffix instead of modality-specific phrases.
AGNOSTIC_SUFFIX = "Answer based on the given input."
# data.prompt_style: what ends a prompt (default: modality for the datasets posed as instruction
# following, where fedsim writes the instruction; verbatim for conversation data, whose
# instruction is the user's own words)
PROMPT_STYLES = ("default", "modality", "agnostic", "verbatim")


def class_answer(name: str) -> str:
    """A class name as the answer the model generates (``infrastructure_damage`` ->
    ``infrastructure damage``)."""
    return name.replace("_", " ")


def target_kind(data_cfg) -> str:
    """``caption`` (free text answers) or ``label`` (a class name) for a dataset config."""
    if data_cfg.dataset == "emoji":
        return data_cfg.target
    return "caption" if data_cfg.dataset == "llava" else "label"


@dataclass
class PromptBuilder:
    """Builds a row's user text from its text and the modalities it keeps.

    Attributes:
        instruction: the question (None: the row's text is the instruction).
        text_name: how the row's text is introduced (``Hint: ...``).
        style: what ends the prompt: ``modality`` (a phrase naming the modalities present:
            "Use the image and the text."), ``agnostic`` (FedMLLM's one neutral suffix),
            ``verbatim`` (nothing: the instruction as written) or ``default`` (``verbatim``
            when the row's text is the instruction, a conversation dataset's; ``modality``
            otherwise).
        fill: ``data.text_fill``; ``placeholder`` puts ``placeholder`` in a missing text's place.
        placeholder: ``data.text_placeholder``.
        choices: a label task's answers, named in the prompt.
    """

    instruction: str | None
    text_name: str
    style: str
    fill: str
    placeholder: str
    choices: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.style not in PROMPT_STYLES:
            raise ValueError(f"prompt style {self.style!r}; allowed: {', '.join(PROMPT_STYLES)}")
        if self.style == "default":
            self.style = "verbatim" if self.instruction is None else "modality"

    def __call__(self, text: str, has_image: bool, has_text: bool) -> str:
        if not has_text:
            text = self.placeholder if self.fill == "placeholder" else ""
        parts = []
        if self.instruction is not None:
            parts.append(self.instruction)
            if self.choices:
                parts.append(f"Answer with one of: {', '.join(self.choices)}.")
            if text:
                end = "" if text.rstrip()[-1:] in ".?!" else "."
                parts.append(f"{self.text_name}: {text.rstrip()}{end}")
        elif text:
            parts.append(text)
        if self.style == "agnostic":
            parts.append(AGNOSTIC_SUFFIX)
        elif self.style == "modality":
            parts.append(_phrase(has_image, has_text))
        return " ".join(p for p in parts if p)


def prompt_for(data_cfg, classes: list[str]) -> PromptBuilder:
    """The prompt builder of a dataset config (``data.*``); a label task's answers are
    ``classes`` as :func:`class_answer` writes them."""
    kind = target_kind(data_cfg)
    instruction, text_name = _PROMPTS[(data_cfg.dataset, kind)]
    return PromptBuilder(
        instruction,
        text_name,
        data_cfg.prompt_style,
        data_cfg.text_fill,
        data_cfg.text_placeholder,
        [class_answer(c) for c in classes] if kind == "label" else [],
    )


def answers_of(data_cfg, dataset) -> list[str]:
    """Each row's reference answer: its caption, or (a label task) its class's answer."""
    if target_kind(data_cfg) == "label":
        return [class_answer(dataset.classes[int(y)]) for y in dataset.labels.tolist()]
    return list(dataset.targets)


def _phrase(has_image: bool, has_text: bool) -> str:
    if has_image and has_text:
        return "Use the image and the text."
    return "Use the image." if has_image else "Use the text." if has_text else ""


@dataclass
class GenerationPart:
    """A shard of generation results.

    Attributes:
        rows: dataset rows, in order.
        predictions / references / prompts: the generated, reference and prompt texts.
        nll / tokens: the summed negative log-likelihood of the reference answers (teacher
            forcing) and their token count.
        labels / scores: a label task's true classes and per-class answer log-likelihoods.
        choices: a label task's answers (index = class), else empty.
        refs: an image reference per row (for the example table).
        examples: how many example rows the combined table keeps.
    """

    rows: list[int]
    predictions: list[str]
    references: list[str]
    prompts: list[str]
    refs: list[str]
    nll: float = 0.0
    tokens: int = 0
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    choices: list[str] = field(default_factory=list)
    examples: int = 8

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def combine(cls, parts: list[GenerationPart]) -> tuple[dict[str, float], list[dict]]:
        preds = [p for part in parts for p in part.predictions]
        refs = [r for part in parts for r in part.references]
        metrics = generation_metrics(preds, refs)
        tokens = sum(p.tokens for p in parts)
        metrics["loss"] = sum(p.nll for p in parts) / max(tokens, 1)
        choices = parts[0].choices
        if choices:
            metrics.update(
                label_metrics(
                    preds,
                    np.concatenate([p.labels for p in parts]),
                    np.concatenate([p.scores for p in parts]),
                    choices,
                )
            )
        rows = []
        for part in parts:
            for i in range(len(part)):
                if len(rows) >= parts[0].examples:
                    break
                rows.append(
                    {
                        "image": part.refs[i],
                        "prompt": part.prompts[i],
                        "reference": part.references[i],
                        "output": part.predictions[i],
                        "rouge_l": sample_metrics(part.predictions[i], [part.references[i]])[
                            "rouge_l"
                        ],
                    }
                )
        return metrics, rows


def label_metrics(
    predictions: list[str], labels: np.ndarray, scores: np.ndarray, choices: list[str]
) -> dict[str, float]:
    """Accuracy and macro-F1 of generated answers, and AUC of the answers' likelihoods.

    A generated answer that names no class (after :func:`normalize_answer`) counts as wrong.
    Macro-F1 averages over the classes that occur in the truth or in the valid answers. AUC
    (binary tasks with both classes present) ranks samples by the softmax over the classes'
    answer log-likelihoods.
    """
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    index = {normalize_answer(c): i for i, c in enumerate(choices)}
    pred = np.array([index.get(normalize_answer(p), -1) for p in predictions], dtype=np.int64)
    present = sorted((set(labels.tolist()) | set(pred.tolist())) - {-1})
    out = {
        "accuracy": float(accuracy_score(labels, pred)),
        "macro_f1": float(f1_score(labels, pred, labels=present, average="macro", zero_division=0)),
        "answer_valid": float(np.mean(pred >= 0)),
    }
    if len(choices) == 2 and len(set(labels.tolist())) == 2:
        probs = torch.softmax(torch.from_numpy(scores), dim=-1).numpy()
        out["auc"] = float(roc_auc_score(labels, probs[:, 1]))
    return out


class GenerationTask:
    """Conversations from rows; the assistant-token loss; greedy generation for evaluation.

    Args:
        cfg: the experiment config (``data.*`` for prompts and fills, ``eval.*``,
            ``train.precision``).
        backbone: a generative backbone (its ``tokenizer`` is a
            :class:`fedsim.models.vlm.ChatCodec`).
        dataset: the rows (``targets`` hold the answers of a caption task).
        device: where the model runs.
    """

    kind = "generation"

    def __init__(self, cfg, backbone, dataset, device: torch.device):
        self.cfg = cfg
        self.codec = backbone.tokenizer
        self.dataset = dataset
        self.device = device
        self.prompt = prompt_for(cfg.data, dataset.classes)
        self.choices = self.prompt.choices
        self.answers = answers_of(cfg.data, dataset)
        max_tokens = cfg.data.max_text_tokens
        self._texts = [self.codec.truncate(t, max_tokens) for t in dataset.texts]

    def samples(self, split: Split, positions: np.ndarray) -> list[Sample]:
        """The conversations of ``split``'s rows at ``positions``, fills applied."""
        out = []
        zeros = self.cfg.data.image_fill == "zeros"
        for p in positions.tolist():
            row = int(split.rows[p])
            has_image, has_text = bool(split.mask.image[p]), bool(split.mask.text[p])
            image = self.dataset.images[row]
            if not has_image:
                # zeros: a black image (zero pixels) in the image's place, FediLoRA's fill; the
                # processor normalises it like any image (Idefics3 would take an all-zero
                # model input for padding). mask: no image in the prompt at all.
                image = torch.zeros_like(image) if zeros else None
            text = self.prompt(self._texts[row], has_image, has_text)
            answer = self.answers[row]
            if split.label_map is not None:  # a label-flipping attacker's poisoned answer
                answer = self.choices[int(split.label_map[int(self.dataset.labels[row])])]
            out.append(Sample(image, text, answer))
        return out

    def train_batches(self, split: Split, batch_size: int, generator):
        order = np.arange(len(split))
        if generator is not None:
            order = generator.permutation(order)
        for start in range(0, len(order), batch_size):
            yield self.codec.encode_train(self.samples(split, order[start : start + batch_size]))

    def loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        with autocast(self.cfg.train.precision, self.device):
            out = model(**batch)
        return out.loss.float(), len(batch["input_ids"])

    def evaluate(self, model: torch.nn.Module, split: Split) -> dict[str, float]:
        starts = np.arange(0, len(split), self.cfg.train.eval_batch_size)
        part = self.eval_part(model, split, starts, self.cfg.train.eval_batch_size)
        return GenerationPart.combine([part])[0]

    @torch.no_grad()
    def eval_part(
        self, model: torch.nn.Module, split: Split, starts: np.ndarray, batch_size: int
    ) -> GenerationPart:
        model.eval()
        part = GenerationPart([], [], [], [], [], choices=self.choices)
        part.examples = self.cfg.eval.examples
        labels, scores = [], []
        for s in starts.tolist():
            positions = np.arange(s, min(s + batch_size, len(split)))
            samples = self.samples(split, positions)
            part.predictions += self._generate(model, samples)
            nll, tokens = self._answer_logprobs(model, samples)
            part.nll -= float(nll.sum())
            part.tokens += int(tokens.sum())
            rows = split.rows[positions].tolist()
            part.rows += rows
            part.references += [s.answer for s in samples]
            part.prompts += [s.text for s in samples]
            refs = self.dataset.refs
            part.refs += [refs[r] if refs else f"row {r}" for r in rows]
            if self.choices:
                labels.append(self.dataset.labels[rows].numpy())
                scores.append(self._choice_scores(model, samples))
        if self.choices and labels:
            part.labels = np.concatenate(labels)
            part.scores = np.concatenate(scores)
        return part

    def _generate(self, model, samples: list[Sample]) -> list[str]:
        batch = {k: v.to(self.device) for k, v in self.codec.encode_prompt(samples).items()}
        with autocast(self.cfg.train.precision, self.device):
            out = model.generate(
                **batch,
                max_new_tokens=self.cfg.eval.max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=self.codec.pad_id,
                eos_token_id=self.codec.tokenizer.eos_token_id,
            )
        return self.codec.decode_new(out.cpu(), batch["input_ids"].shape[1])

    def _answer_logprobs(self, model, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: the summed log-probability of its answer tokens, and their count."""
        batch = {k: v.to(self.device) for k, v in self.codec.encode_train(samples).items()}
        labels = batch.pop("labels")
        with autocast(self.cfg.train.precision, self.device):
            logits = model(**batch).logits
        logits, targets = logits[:, :-1].float(), labels[:, 1:]  # position t predicts t + 1
        mask = targets != IGNORE
        logp = F.log_softmax(logits, dim=-1)
        picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
        return (picked * mask).sum(1).cpu(), mask.sum(1).cpu()

    def _choice_scores(self, model, samples: list[Sample]) -> np.ndarray:
        """``(B, classes)`` summed log-likelihoods of each class's answer."""
        cols = []
        for choice in self.choices:
            posed = [Sample(s.image, s.text, choice) for s in samples]
            cols.append(self._answer_logprobs(model, posed)[0])
        return torch.stack(cols, dim=1).numpy()
