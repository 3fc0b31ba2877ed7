"""Tiny random image-text-to-text models with processors, built offline for tests.

``build_tiny_vlm(family, directory, seed)`` writes a model and its processor into ``directory``
so that ``AutoProcessor.from_pretrained(directory)`` and
``AutoModelForImageTextToText.from_pretrained(directory)`` load them back (no hub access). Each
family has a 2-layer vision tower and a 2-layer language model of width 64 (every q/k/v/o
projection is 64 x 64), 64 px images, a byte-level BPE tokenizer trained here on a small corpus
and a chat template that marks assistant turns with ``{% generation %}``. Seeded under
``torch.random.fork_rng()`` (the caller's RNG is untouched; same seed, same weights). Build:
~0.1 s, plus ~3 s once per process for transformers' lazy model imports.

Chat format (all families)::

    [{"role": "user", "content": [{"type": "image", "image": pil}, {"type": "text", "text": u}]},
     {"role": "assistant", "content": [{"type": "text", "text": a}]}]

renders as ``<s>User:<image> u<eot>\\nAssistant:\\na<eot>\\n`` (``<image>`` expanded by the
processor; PaliGemma has no leading ``<s>``, see 1.); the end-of-turn token ``<eot>`` is
``processor.tokenizer.eos_token`` (``<|end|>``; ``<end_of_utterance>`` for idefics3) and is the
model's ``generation_config.eos_token_id``, so ``generate`` stops on it. Put the PIL image in the
message (``{"type": "image", "image": pil}``): that works batched in every family and is what
these tests use. (``{"type": "image"}`` plus ``images=[[pil], [pil], ...]``, one list per
conversation, also works but logs a kwargs warning; a flat ``images=[pil, pil]`` raises
``TypeError``.)

Facts measured with transformers 5.24, peft 0.21, torch 2.13 (CPU):

1. Training batch. ``enc = processor.apply_chat_template(convs, tokenize=True,
   return_dict=True, return_assistant_tokens_mask=True, processor_kwargs={"padding": True},
   return_tensors="pt")`` with right padding (the default). ``padding=True`` as a plain keyword
   works too but logs "Kwargs passed to `processor.__call__` have to be in `processor_kwargs`".
   ``labels = input_ids.where(assistant_masks == 1, -100)``; the mask covers exactly the
   assistant text and its ``<eot>`` (checked by decoding). Pass the model every key except
   ``assistant_masks`` and the processor's own ``labels`` (PaliGemma returns one, all -100).

   - llava: ``input_ids``, ``attention_mask`` [B, T]; ``pixel_values`` [n_images, 3, 64, 64]
     (one row per image actually present); 16 ``<image>`` tokens per image. A sample without
     an image (no image block) batches with samples that have one.
   - idefics3: ``pixel_values`` [B, max_images, 3, 64, 64] and ``pixel_attention_mask``
     [B, max_images, 64, 64] (padded with zeros); each image renders as
     ``<fake_token_around_image><global-img>`` + 4 ``<image>`` + ``<fake_token_around_image>``.
     A sample without an image batches with others (its slot is an all-zero padding image).
     Images of any size/aspect come out 64 x 64 with 4 image tokens.
   - paligemma: also ``token_type_ids`` [B, T]; the processor returns it all 0, which makes
     the WHOLE sequence one bidirectional block (the answer sees its own future: a leak). For
     training set ``token_type_ids = (assistant_masks.cumsum(1) > 0).long()`` (1 from the first
     assistant token to the end, padding included; 0 on image + prompt): earlier logits then
     do not change when a later answer token does (with the processor's all-0 ids they do).
     Dropping ``token_type_ids`` also avoids the leak (fully causal) but no longer matches
     ``generate``, which uses a bidirectional prompt prefix. The processor inserts
     ``<bos>`` after the last ``<image>`` and appends ``"\\n"`` to every text; its assistant
     mask does not account for the inserted ``<bos>`` (it would slide 3 characters left onto
     ``Assistant:\\n``), so this family's template starts the generation block
     ``len(bos_token)`` characters late to compensate (single image before the answer). Every
     sample needs an image: without one the ``<bos>`` lands at character 6 and a batch with no
     image at all raises ``ValueError`` ("`images` are expected"). Use a blank image instead
     (``Image.new("RGB", (64, 64))``): it works in every family and keeps shapes fixed.

2. Generation. ``processor.tokenizer.padding_side = "left"``; ``enc =
   processor.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True,
   return_dict=True, processor_kwargs={"padding": True}, return_tensors="pt")`` where each
   prompt is the user message alone (no assistant turn); drop ``labels`` if present
   (PaliGemma); ``out = model.generate(**enc, max_new_tokens=8, do_sample=False)``; new tokens
   are ``out[:, enc["input_ids"].shape[1]:]`` (decode with ``skip_special_tokens=True``). The
   prompt ends with ``Assistant:\\n`` in every family (PaliGemma: the template stops at
   ``Assistant:`` and the processor's ``"\\n"`` completes it). PaliGemma keeps the processor's
   all-0 ``token_type_ids`` for the prompt (bidirectional prefix); ``generate`` gives new tokens
   type 1 itself. Left-padded batched greedy output equals per-sample output in all three families.

3. LoRA targets: ``target_modules=r".*\\.(q_proj|v_proj)$"`` matches 8 modules, all
   ``nn.Linear(64, 64)`` (max rank 64):
   llava, paligemma: ``model.vision_tower.encoder.layers.{0,1}.self_attn.{q,v}_proj`` and
   ``model.language_model.layers.{0,1}.self_attn.{q,v}_proj``;
   idefics3: ``model.vision_model.encoder.layers.{0,1}.self_attn.{q,v}_proj`` and
   ``model.text_model.layers.{0,1}.self_attn.{q,v}_proj``
   (under ``get_peft_model`` all are prefixed ``base_model.model.``).

4. ``get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=...))`` + forward +
   backward (every ``lora_B`` gets a non-zero gradient, vision layers included; ``lora_A``
   gradients are zero on the first step because ``lora_B`` starts at 0) + ``generate`` work
   on all three. LLaVA uses ``vision_feature_layer=-1`` so the last vision layer is not dead
   (the default -2 would leave its LoRA without gradient).
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llava", "idefics3", "paligemma")

IMAGE_SIZE = 64
PATCH_SIZE = 16
HIDDEN = 64
HEADS = 4
LAYERS = 2
VOCAB = 512

PAD, BOS, EOT, IMAGE = "<pad>", "<s>", "<|end|>", "<image>"
IDEFICS3_EOT = "<end_of_utterance>"
IDEFICS3_EXTRA = [
    "<fake_token_around_image>",
    "<global-img>",
    *(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)),
]

_CORPUS = [
    "the a an of on in at with and or is are it its what this that there here which who",
    "face faces smiling smile smiles happy sad laughing crying angry wink grinning eyes",
    "cat cats dog dogs red green blue yellow white black orange purple brown pink grey",
    "flag flags heart hearts star stars sun moon tree car house person man woman child",
    "hand hands mouth user assistant describe image picture emoji shows see color colour",
    "zero one two three four five six seven eight nine ten yes no not",
    "The face is smiling. A red flag! A cat, a dog; the sun? Yes: no - maybe...",
    "What is in the image? A smiling face with red cheeks and a black cat.",
    "Describe the picture: a yellow star, a blue flag and a green tree.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 2024 3.14 1,000",
    "( ) [ ] { } ' \" / \\ + = * & % $ # @ ~ ` ^ | < > ! ? . , ; : - _",
    "User: Assistant:\nUser:\nAssistant:\n",
]


def _chat_template(*, bos: bool, generation_newline: bool, mask_shift: int) -> str:
    """The family's Jinja template; ``mask_shift`` delays the generation block by N chars."""
    reply = (
        "{%- set ns = namespace(text='') -%}"
        "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}"
        "{%- else -%}{%- for c in message['content'] -%}"
        "{%- if c['type'] == 'text' -%}{%- set ns.text = ns.text + c['text'] -%}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- set reply = ns.text + eos_token -%}"
    )
    if mask_shift:
        block = (
            f"{{{{- reply[:{mask_shift}] -}}}}"
            f"{{% generation %}}{{{{- reply[{mask_shift}:] -}}}}{{% endgeneration %}}"
        )
    else:
        block = "{% generation %}{{- reply -}}{% endgeneration %}"
    user = (
        "{{- 'User:' -}}"
        "{%- if message['content'] is string -%}{{- ' ' + message['content'] -}}"
        "{%- else -%}{%- for c in message['content'] -%}"
        "{%- if c['type'] == 'image' -%}{{- '<image>' -}}"
        "{%- elif c['type'] == 'text' -%}{{- ' ' + c['text'] -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{- eos_token + '\\n' -}}"
    )
    prompt = "Assistant:\\n" if generation_newline else "Assistant:"
    return (
        ("{{- bos_token -}}" if bos else "")
        + "{%- for message in messages -%}"
        + "{%- if message['role'] == 'assistant' -%}"
        + "{{- 'Assistant:\\n' -}}"
        + reply
        + block
        + "{{- '\\n' -}}"
        + "{%- else -%}"
        + user
        + "{%- endif -%}"
        + "{%- endfor -%}"
        + "{%- if add_generation_prompt -%}{{- '"
        + prompt
        + "' -}}{%- endif -%}"
    )


def _tokenizer(eos: str, extra_special: list[str], chat_template: str):
    """A byte-level BPE tokenizer trained on ``_CORPUS`` with the family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[PAD, BOS, eos, IMAGE, *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=eos,
        pad_token=PAD,
        chat_template=chat_template,
    )


def _vision_kwargs() -> dict:
    return {
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
    }


def _text_kwargs(tokenizer) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _llava():
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    template = _chat_template(bos=True, generation_newline=True, mask_shift=0)
    tokenizer = _tokenizer(EOT, [], template)
    processor = LlavaProcessor(
        CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE),
        tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(projection_dim=HIDDEN, **_vision_kwargs()),
        text_config=LlamaConfig(**_text_kwargs(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    return processor, LlavaForConditionalGeneration(config)


def _idefics3():
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )

    template = _chat_template(bos=True, generation_newline=True, mask_shift=0)
    tokenizer = _tokenizer(IDEFICS3_EOT, IDEFICS3_EXTRA, template)
    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
        do_image_splitting=False,
    )
    scale_factor = 2
    processor = Idefics3Processor(
        image_processor,
        tokenizer,
        image_seq_len=(IMAGE_SIZE // PATCH_SIZE // scale_factor) ** 2,
        chat_template=template,
    )
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(**_vision_kwargs()),
        text_config=LlamaConfig(**_text_kwargs(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        scale_factor=scale_factor,
    )
    return processor, Idefics3ForConditionalGeneration(config)


def _paligemma():
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    # The processor inserts <bos> after the last <image> itself and appends "\n" to the text.
    template = _chat_template(bos=False, generation_newline=False, mask_shift=len(BOS))
    tokenizer = _tokenizer(EOT, [], template)
    image_processor = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    image_processor.image_seq_length = (IMAGE_SIZE // PATCH_SIZE) ** 2
    processor = PaliGemmaProcessor(image_processor, tokenizer, chat_template=template)
    vocab = len(tokenizer)  # the processor added 1,152 <locNNNN>/<segNNN> tokens
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(vision_use_head=False, **_vision_kwargs()),
        text_config=GemmaConfig(head_dim=HIDDEN // HEADS, **_text_kwargs(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        vocab_size=vocab,
        projection_dim=HIDDEN,
        hidden_size=HIDDEN,
    )
    return processor, PaliGemmaForConditionalGeneration(config)


_BUILDERS = {"llava": _llava, "idefics3": _idefics3, "paligemma": _paligemma}


def build_tiny_vlm(family: str, directory: str | Path, seed: int = 0) -> Path:
    """Build and save a tiny random <family> VLM with its processor into directory; return it."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    directory = Path(directory)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        processor, model = _BUILDERS[family]()
    tokenizer = processor.tokenizer
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    directory.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(directory)
    model.save_pretrained(directory)
    return directory
