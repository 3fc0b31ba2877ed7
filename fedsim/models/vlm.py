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
        zero_image: the image is present in the prompt but its pixels are zeros (FediLoRA's
            fill for a missing image).
    """

    image: torch.Tensor | None
    text: str
    answer: str | None = None
    zero_image: bool = False


class ChatCodec:
    """Samples to model inputs, and generated ids back to text (see the module docstring).

    Subclasses implement :meth:`prompt` (one sample's prompt tensors, batch dimension 1).
    """

    tokenizer: object

    def prompt(self, sample: Sample) -> dict[str, torch.Tensor]:
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

    def encode_train(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        """A right-padded training batch; ``labels`` cover the answers and their end tokens."""
        prompts = [self.prompt(s) for s in samples]
        answers = [torch.tensor(self.answer_ids(s.answer or ""), dtype=torch.long) for s in samples]
        return self._assemble(prompts, answers, left=False)

    def encode_prompt(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        """A left-padded generation batch (the prompts end at the assistant's turn)."""
        return self._assemble([self.prompt(s) for s in samples], None, left=True)

    def decode_new(self, output: torch.Tensor, prompt_len: int) -> list[str]:
        """The generated continuations after ``prompt_len`` prompt positions, as text."""
        return [
            self.tokenizer.decode(row[prompt_len:], skip_special_tokens=True).strip()
            for row in output.tolist()
        ]

    def _assemble(self, prompts, answers, left: bool) -> dict[str, torch.Tensor]:
        """Concatenate prompt and answer per sample, pad, and stack the per-image tensors."""
        seqs, extras = [], {}
        for i, p in enumerate(prompts):
            ids = p["input_ids"][0]
            n = len(ids)
            ans = answers[i] if answers is not None else torch.zeros(0, dtype=torch.long)
            row = {
                "input_ids": torch.cat([ids, ans]),
                "attention_mask": torch.ones(n + len(ans), dtype=torch.long),
                "labels": torch.cat([torch.full((n,), IGNORE), ans]),
            }
            for k, v in p.items():
                if k in ("input_ids", "attention_mask"):
                    continue
                if v.dim() >= 2 and v.shape[:2] == (1, n):  # a per-token key
                    # PaliGemma's token_type_ids mark the answer (suffix) with 1; other
                    # per-token keys (Qwen's mm_token_type_ids) mark text with 0.
                    fill = 1 if k == "token_type_ids" else 0
                    row[k] = torch.cat([v[0], torch.full((len(ans),), fill, dtype=v.dtype)])
                else:  # per-image tensors: stacked along the first dimension
                    extras.setdefault(k, []).append(v)
            seqs.append(row)
        longest = max(len(r["input_ids"]) for r in seqs)
        batch: dict[str, torch.Tensor] = {}
        for key in seqs[0]:
            pad = {"input_ids": self.pad_id, "labels": IGNORE}.get(key, 0)
            rows = []
            for r in seqs:
                gap = torch.full((longest - len(r[key]),), pad, dtype=r[key].dtype)
                rows.append(torch.cat([gap, r[key]] if left else [r[key], gap]))
            batch[key] = torch.stack(rows)
        if answers is None:
            del batch["labels"]
        for k, vs in extras.items():
            batch[k] = torch.cat(vs)
        return batch


def _pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray(image.permute(1, 2, 0).numpy())


class HFChatCodec(ChatCodec):
    """The codec of a Hugging Face processor with a chat template.

    Args:
        processor: the model's ``AutoProcessor``.
    """

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if getattr(processor, "chat_template", None) is None:
            raise ConfigError(
                "model.name_or_path",
                "the model's processor has no chat template; fedsim renders prompts with it",
            )

    def prompt(self, sample: Sample) -> dict[str, torch.Tensor]:
        content = [{"type": "image"}] if sample.image is not None else []
        if sample.text:
            content.append({"type": "text", "text": sample.text})
        text = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        kwargs = {"images": [[_pil(sample.image)]]} if sample.image is not None else {}
        enc = self.processor(text=[text], return_tensors="pt", **kwargs)
        out = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
        if sample.zero_image and "pixel_values" in out:
            out["pixel_values"] = torch.zeros_like(out["pixel_values"])
        return out


class DemoChatCodec(ChatCodec):
    """The built-in VLM's codec: SmolLM2's ChatML with one slot per image feature.

    The prompt is ``<|im_start|>user\\n[image slots]text<|im_end|>\\n<|im_start|>assistant\\n``
    (ChatML without SmolLM2's 21-token default system prompt: short sequences are what make the
    demo fast on CPUs). An ``S x S`` image gives ``ceil(S / stride) ** 2`` slots (the vision
    encoder's feature map, SAME padding) carrying ``image_token_id``; the model puts the
    projected image features there.
    """

    def __init__(self, tokenizer, image_token_id: int, stride: int):
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.stride = stride
        self._head = tokenizer("<|im_start|>user\n", add_special_tokens=False)["input_ids"]
        self._tail = tokenizer("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)[
            "input_ids"
        ]

    def prompt(self, sample: Sample) -> dict[str, torch.Tensor]:
        text = self.tokenizer(sample.text, add_special_tokens=False)["input_ids"]
        slots = []
        if sample.image is not None:
            h, w = sample.image.shape[-2:]
            slots = [self.image_token_id] * (
                math.ceil(h / self.stride) * math.ceil(w / self.stride)
            )
        ids = torch.tensor([[*self._head, *slots, *text, *self._tail]], dtype=torch.long)
        out = {"input_ids": ids}
        if sample.image is not None:
            pixels = (sample.image.float() / 255.0 - _PIXEL_MEAN) / _PIXEL_STD
            out["pixel_values"] = (pixels * (0.0 if sample.zero_image else 1.0)).unsqueeze(0)
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
        if pixel_values is None or not slots.any():
            return embeds
        feats = self.image_features(pixel_values.to(embeds.dtype))
        if feats.shape[0] * feats.shape[1] != int(slots.sum()):
            raise ValueError(
                f"{int(slots.sum())} image slots in input_ids but {feats.shape[0]} images of "
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

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.lm.gradient_checkpointing_enable(**kwargs)


def _suffix_regex(model: nn.Module, suffixes: list[str]) -> str:
    """A peft target regex matching every module whose name ends in one of ``suffixes``."""
    alt = "|".join(re.escape(s) for s in suffixes)
    return rf".*\.({alt})"


def _max_rank(model: nn.Module, pattern: str) -> tuple[int, int]:
    """The largest rank the matched Linear modules admit, and how many match."""
    dims = [
        min(m.in_features, m.out_features)
        for n, m in model.named_modules()
        if re.fullmatch(pattern, n) and isinstance(m, nn.Linear)
    ]
    if not dims:
        raise ConfigError(
            "model.targets", f"no Linear module of the model matches the LoRA targets {pattern!r}"
        )
    return min(dims), len(dims)


def _build_demo(cfg: ModelConfig):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from fedsim.models.efficientnet_lite import pretrained_lite0
    from fedsim.models.smollm import smollm2_dir

    path = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    lm = LlamaForCausalLM.from_pretrained(path, dtype=dtype)
    # <|endoftext|> (id 0) never occurs inside a chat turn: it marks the image slots
    image_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    vision = pretrained_lite0()
    model = ProjectedVLM(vision, vision.out_dim, lm, image_token_id)
    # EfficientNet-Lite0's stride is 32: 64 px images give a 2 x 2 map, 4 image tokens
    codec = DemoChatCodec(tokenizer, image_token_id, stride=32)
    return model, codec, ("projector",)


def _build_hf(cfg: ModelConfig):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    try:
        processor = AutoProcessor.from_pretrained(cfg.name_or_path)
        model = AutoModelForImageTextToText.from_pretrained(cfg.name_or_path, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise ConfigError(
            "model.name_or_path",
            f"cannot load {cfg.name_or_path!r} as an image-text-to-text "
            f"model with its processor: {reason}",
        ) from None
    if processor.tokenizer.pad_token_id is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return model, HFChatCodec(processor), ()


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
    targets = _suffix_regex(model, list(cfg.targets))
    max_rank, _ = _max_rank(model, targets)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.eval()
    return Backbone(model, codec, targets, max_rank, task="generation", dense_modules=dense)


def lora_targets_report(model: nn.Module, suffixes: list[str]) -> dict[str, int]:
    """How many modules the targets match per top-level part of the model (README tables)."""
    pattern = _suffix_regex(model, suffixes)
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        if re.fullmatch(pattern, name) and isinstance(module, nn.Linear):
            part = ".".join(name.split(".")[:2])
            counts[part] = counts.get(part, 0) + 1
    return counts
