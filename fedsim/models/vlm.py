"""Generative vision-language models: any Hugging Face image-text-to-text model, and a
built-in pretrained one that runs offline (EfficientNet-Lite0 + projector + SmolLM2-135M).

Both come with a :class:`ChatCodec` that turns samples (an image or none, the user's text, the
assistant's answer) into model inputs. A training sequence is the rendered prompt (the chat
template up to the assistant's turn, image tokens expanded by the processor) followed by the
answer's tokens and the end-of-sequence token; the labels are -100 everywhere but on those
answer tokens, so the loss covers the assistant's tokens only, whatever the chat template.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from fedsim.config import ConfigError, ModelConfig

IGNORE = -100
# EfficientNet-Lite was trained on inputs scaled to [-1, 1] (as fedsim.data.federated).
_PIXEL_MEAN = _PIXEL_STD = 0.5


@dataclass(frozen=True)
class Sample:
    """One conversation turn pair.

    Attributes:
        image: ``(3, S, S)`` uint8, or None (no image in the prompt).
        text: the user's text (the instruction, with any hint).
        answer: the assistant's answer (None for a generation prompt).
    """

    image: torch.Tensor | None
    text: str
    answer: str | None = None


class ChatCodec:
    """Samples to model inputs, and generated ids back to text (see the module docstring).

    Subclasses implement :meth:`prompts`: the prompts of a batch, right-padded, with the
    per-image tensors the model takes.
    """

    tokenizer: object

    def prompts(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def answer_ids(self, answer: str) -> list[int]:
        """The answer's token ids followed by the end-of-sequence token."""
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        return [*ids, self.tokenizer.eos_token_id]

    def truncate(self, text: str, max_tokens: int) -> str:
        """``text`` cut to at most ``max_tokens`` tokens."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            return text
        return self.tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)

    def prompt_overhead(self, image: torch.Tensor | None) -> int:
        """Tokens of a prompt with ``image`` and no text: the chat template and the image's
        tokens, what every prompt adds around its text."""
        return int(self.prompts([Sample(image, "")])["attention_mask"].sum())

    def encode_train(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        """A right-padded training batch; ``labels`` cover the answers and their end tokens."""
        answers = [torch.tensor(self.answer_ids(s.answer or ""), dtype=torch.long) for s in samples]
        return _join(self.prompts(samples), answers, self.pad_id, left=False)

    def encode_prompt(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        """A left-padded generation batch (the prompts end at the assistant's turn)."""
        return _join(self.prompts(samples), None, self.pad_id, left=True)

    def decode_new(self, output: torch.Tensor, prompt_len: int) -> list[str]:
        """The generated continuations after ``prompt_len`` prompt positions, as text."""
        return [
            self.tokenizer.decode(row[prompt_len:], skip_special_tokens=True).strip()
            for row in output.tolist()
        ]


def _join(enc: dict, answers: list[torch.Tensor] | None, pad_id: int, left: bool) -> dict:
    """Append each sample's answer to its (right-padded) prompt and pad again.

    Per-token tensors (``(B, T)`` like ``input_ids``) are cut to each prompt's length, extended
    over the answer and padded; per-image tensors pass through unchanged. ``labels`` are -100
    on the prompt and the padding.
    """
    ids, mask = enc["input_ids"], enc["attention_mask"]
    per_token = [k for k, v in enc.items() if v.shape[:2] == ids.shape and k != "attention_mask"]
    lengths = mask.sum(1).tolist()
    rows = []
    for i, n in enumerate(lengths):
        ans = answers[i] if answers is not None else torch.zeros(0, dtype=torch.long)
        row = {"attention_mask": torch.ones(n + len(ans), dtype=torch.long)}
        row["labels"] = torch.cat([torch.full((n,), IGNORE), ans])
        for k in per_token:
            # input_ids continue with the answer; PaliGemma's token_type_ids mark the answer
            # (its suffix) with 1, so its prefix-LM attention stays causal there; other
            # per-token keys (Qwen's mm_token_type_ids) mark text with 0.
            tail = ans if k == "input_ids" else torch.full((len(ans),), int(k == "token_type_ids"))
            row[k] = torch.cat([enc[k][i, :n], tail.to(enc[k].dtype)])
        rows.append(row)
    longest = max(len(r["input_ids"]) for r in rows)
    out: dict[str, torch.Tensor] = {}
    for key in rows[0]:
        pad = {"input_ids": pad_id, "labels": IGNORE}.get(key, 0)
        padded = []
        for r in rows:
            gap = torch.full((longest - len(r[key]),), pad, dtype=r[key].dtype)
            padded.append(torch.cat([gap, r[key]] if left else [r[key], gap]))
        out[key] = torch.stack(padded)
    if answers is None:
        del out["labels"]
    out.update({k: v for k, v in enc.items() if k not in out and k not in per_token})
    return out


def _pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray(image.permute(1, 2, 0).numpy())


class HFChatCodec(ChatCodec):
    """The codec of a Hugging Face processor with a chat template.

    Prompts are the chat template applied to the user turn with ``add_generation_prompt``
    (images inside the message, as every family's processor takes them batched); the processor
    expands the image tokens.

    Args:
        processor: the model's ``AutoProcessor``.
    """

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "right"  # _join re-pads each side as needed
        if getattr(processor, "chat_template", None) is None:
            raise ConfigError(
                "model.name_or_path",
                "the model's processor has no chat template; fedsim renders prompts with it",
            )

    def prompts(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        convs = []
        for s in samples:
            content = [{"type": "image", "image": _pil(s.image)}] if s.image is not None else []
            if s.text:
                content.append({"type": "text", "text": s.text})
            convs.append([{"role": "user", "content": content}])
        try:
            enc = self.processor.apply_chat_template(
                convs,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                processor_kwargs={"padding": True},
            )
        except ValueError as exc:
            if any(s.image is None for s in samples):
                raise ConfigError(
                    "data.image_fill",
                    f"this model's processor cannot take a prompt without an image ({exc}); "
                    "use data.image_fill=zeros",
                ) from None
            raise
        enc.pop("labels", None)  # PaliGemma's processor adds all -100 labels
        return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}


class DemoChatCodec(ChatCodec):
    """The built-in VLM's codec: SmolLM2's ChatML with one slot per image feature.

    The prompt is ``<|im_start|>user\\n[image slots]text<|im_end|>\\n<|im_start|>assistant\\n``
    (ChatML without SmolLM2's 21-token default system prompt: short sequences are what make the
    demo fast on CPUs). An ``S x S`` image gives ``ceil(S / stride) ** 2`` slots (the vision
    encoder's feature map, SAME padding) carrying ``image_token_id``; the model puts the
    projected image features there.
    """

    HEAD = "<|im_start|>user\n"
    TAIL = "<|im_end|>\n<|im_start|>assistant\n"

    def __init__(self, tokenizer, image_token_id: int, stride: int):
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.stride = stride
        self._head = tokenizer(self.HEAD, add_special_tokens=False)["input_ids"]
        self._tail = tokenizer(self.TAIL, add_special_tokens=False)["input_ids"]

    @classmethod
    def overhead_bound(cls, image_size: int, stride: int) -> int:
        """At least :meth:`prompt_overhead` of a ``image_size`` image, without the tokenizer:
        the image slots plus the head's and tail's UTF-8 bytes (a token spans at least one
        byte), so the pre-flight need not convert SmolLM2 to learn it."""
        slots = math.ceil(image_size / stride) ** 2
        return slots + len(cls.HEAD.encode()) + len(cls.TAIL.encode())

    def prompts(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        seqs, pixels = [], []
        for s in samples:
            slots = []
            if s.image is not None:
                h, w = s.image.shape[-2:]
                count = math.ceil(h / self.stride) * math.ceil(w / self.stride)
                slots = [self.image_token_id] * count
                pixels.append((s.image.float() / 255.0 - _PIXEL_MEAN) / _PIXEL_STD)
            text = self.tokenizer(s.text, add_special_tokens=False)["input_ids"]
            seqs.append(torch.tensor([*self._head, *slots, *text, *self._tail]))
        longest = max(len(q) for q in seqs)
        ids = torch.full((len(seqs), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for i, q in enumerate(seqs):
            ids[i, : len(q)], mask[i, : len(q)] = q, 1
        out = {"input_ids": ids, "attention_mask": mask}
        if pixels:
            out["pixel_values"] = torch.stack(pixels)  # (images present, 3, S, S)
        return out


class ProjectedVLM(nn.Module):
    """LLaVA's recipe from parts: a vision encoder's feature map, a trained MLP projector, and
    a causal language model that reads the projected features in place of the image slots.

    Args:
        vision: an encoder with ``feature_map(pixels) -> (B, C, h, w)``; frozen, eval mode.
        lm: a causal language model (``LlamaForCausalLM``).
        image_token_id: the id whose positions receive image features.
    """

    def __init__(self, vision: nn.Module, vision_dim: int, lm: nn.Module, image_token_id: int):
        super().__init__()
        self.vision = vision
        self.lm = lm
        hidden = lm.config.hidden_size
        self.projector = nn.Sequential(
            nn.Linear(vision_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.image_token_id = image_token_id
        self.config = lm.config  # peft reads model.config

    def train(self, mode: bool = True) -> ProjectedVLM:
        super().train(mode)
        self.vision.eval()  # frozen BatchNorm statistics must not drift per client
        return self

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(n, 3, S, S)`` pixels to ``(n, h*w, hidden)`` language-model inputs."""
        fmap = self.vision.feature_map(pixel_values)  # (n, C, h, w)
        return self.projector(fmap.flatten(2).transpose(1, 2))  # (n, h*w, hidden)

    def _embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None):
        slots = input_ids == self.image_token_id  # (B, T)
        embeds = self.lm.get_input_embeddings()(input_ids.masked_fill(slots, 0))  # (B, T, H)
        count = int(slots.sum())
        if pixel_values is None or len(pixel_values) == 0:
            if count:
                raise ValueError(f"{count} image slots in input_ids but no pixel_values")
            return embeds
        feats = self.image_features(pixel_values.to(embeds.dtype))
        if feats.shape[0] * feats.shape[1] != count:
            raise ValueError(
                f"{count} image slots in input_ids but {feats.shape[0]} images of "
                f"{feats.shape[1]} features each"
            )
        return embeds.masked_scatter(slots.unsqueeze(-1), feats.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: torch.Tensor,
    ):
        embeds = self._embed(input_ids, pixel_values)
        return self.lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Prompt ids followed by the generated ids, as Hugging Face VLMs return them."""
        embeds = self._embed(input_ids, pixel_values)
        new = self.lm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        return torch.cat([input_ids, new], dim=1)

    def activation_checkpointing_enable(self) -> None:
        enable_checkpointing(self.lm)

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.lm.is_activation_checkpointing


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward (transformers 5 calls it activation checkpointing)."""
    if isinstance(model, ProjectedVLM):
        model.activation_checkpointing_enable()
    else:
        # non-reentrant: the frozen inputs need no grad for the LoRA gradients to flow
        model.activation_checkpointing_enable({"use_reentrant": False})


def _suffix_regex(model: nn.Module, suffixes: list[str]) -> str:
    """A peft target regex matching every module whose name ends in one of ``suffixes``."""
    alt = "|".join(re.escape(s) for s in suffixes)
    return rf".*\.({alt})"


# The layers fedsim puts LoRA on (the merges take their A and B as matrices, a 1x1 or k x k
# convolution's as (r, in, k, k) and (out, r, 1, 1)): anything else is a targeting mistake.
LORA_LAYERS = (nn.Linear, nn.Conv2d)


def targets_key(cfg: ModelConfig) -> str:
    """The config key that chose the LoRA targets."""
    return "model.target_regex" if cfg.target_regex else "model.targets"


def match_targets(model: nn.Module, pattern: str, key: str) -> tuple[int, int]:
    """The largest rank the modules that ``pattern`` fully matches admit, and their count.

    Every matched module must be a Linear or Conv2d layer: a pattern that matches the model
    itself (its name is the empty string), a block or an embedding is refused with counts,
    where peft would print the whole model in its error.

    Raises:
        ConfigError: naming ``key``: nothing matches, or something that is not a layer does.
    """
    matched = [(n, m) for n, m in model.named_modules() if re.fullmatch(pattern, n)]
    if not matched:
        raise ConfigError(
            key,
            f"no module of the model matches the LoRA targets {pattern!r} "
            "(model.targets / model.target_regex)",
        )
    other = [(n, m) for n, m in matched if not isinstance(m, LORA_LAYERS)]
    if other:
        whole = "the model itself among them; " if other[0][0] == "" else ""
        name, module = next(((n, m) for n, m in other if n), other[0])
        raise ConfigError(
            key,
            f"the LoRA targets {pattern!r} match {len(matched)} modules of the model, "
            f"{len(other)} of them not Linear or Conv2d layers ({whole}e.g. {name!r}: "
            f"{type(module).__name__}); match layer names only, e.g. '.*\\.(q_proj|v_proj)'",
        )
    dims = [
        min(m.in_features, m.out_features)
        if isinstance(m, nn.Linear)
        else min(m.in_channels, m.out_channels)
        for _, m in matched
    ]
    return min(dims), len(dims)


def target_pattern(cfg: ModelConfig, model: nn.Module) -> str:
    """The regex of the LoRA targets: ``model.target_regex``, else one built from
    ``model.targets``."""
    return cfg.target_regex or _suffix_regex(model, list(cfg.targets))


# EfficientNet-Lite0's stride: 64 px images give a 2 x 2 map, 4 image tokens
DEMO_STRIDE = 32


def demo_codec() -> DemoChatCodec:
    """The built-in VLM's codec, from SmolLM2's tokenizer (no model weights)."""
    from transformers import AutoTokenizer

    from fedsim.models.smollm import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    # <|endoftext|> (id 0) never occurs inside a chat turn: it marks the image slots
    image_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return DemoChatCodec(tokenizer, image_token_id, stride=DEMO_STRIDE)


def hf_codec(name_or_path: str) -> HFChatCodec:
    """The codec of a Hugging Face model's processor (no model weights).

    Raises:
        OSError, ValueError, KeyError: the processor cannot be loaded (as transformers raises).
        ConfigError: the processor has no chat template.
    """
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(name_or_path)
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return HFChatCodec(processor)


def _build_demo(cfg: ModelConfig):
    from transformers import LlamaForCausalLM

    from fedsim.models.efficientnet_lite import pretrained_lite0
    from fedsim.models.smollm import smollm2_dir

    codec = demo_codec()
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    lm = LlamaForCausalLM.from_pretrained(smollm2_dir(), dtype=dtype)
    vision = pretrained_lite0()
    model = ProjectedVLM(vision, vision.out_dim, lm, codec.image_token_id)
    return model, codec, ("projector",)


def _build_hf(cfg: ModelConfig):
    from transformers import AutoModelForImageTextToText

    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    try:
        codec = hf_codec(cfg.name_or_path)
        model = AutoModelForImageTextToText.from_pretrained(cfg.name_or_path, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        if isinstance(exc, ConfigError):
            raise
        reason = " ".join(str(exc).split())[:300]
        raise ConfigError(
            "model.name_or_path",
            f"cannot load {cfg.name_or_path!r} as an image-text-to-text "
            f"model with its processor: {reason}",
        ) from None
    return model, codec, ()


def build_generative(cfg: ModelConfig, num_classes: int, image_fill: str, text_fill: str):
    """The configured generative backbone (``smolvlm-effnet`` or ``hf-vlm``).

    ``num_classes`` and the fills are the classifier builders' arguments: a generative model
    answers in text, and the task applies the fills when it builds a prompt.
    """
    from fedsim.models.backbone import Backbone

    model, codec, default_dense = (
        _build_demo(cfg) if cfg.backbone == "smolvlm-effnet" else (_build_hf(cfg))
    )
    dense = tuple(cfg.modules_to_save) if cfg.modules_to_save is not None else default_dense
    targets = target_pattern(cfg, model)
    max_rank, _ = match_targets(model, targets, targets_key(cfg))
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    model.eval()
    return Backbone(model, codec, targets, max_rank, task="generation", dense_modules=dense)
