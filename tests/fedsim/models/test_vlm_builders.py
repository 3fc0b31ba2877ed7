"""The tiny offline VLM builders: they reload, train on assistant tokens only and generate."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from vlm_builders import FAMILIES, build_tiny_vlm

TRIPLES = [
    (Image.new("RGB", (40, 30), (200, 10, 10)), "what is it?", "a red flag"),
    (Image.new("RGB", (100, 64), (10, 10, 200)), "the face", "a smiling cat, 42."),
    (None, "and this one?", "no"),
]
TARGETS = r".*\.(q_proj|v_proj)$"


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request, tmp_path_factory):
    """(family, directory) of a model built once per family for this module."""
    family = request.param
    return family, build_tiny_vlm(family, tmp_path_factory.mktemp(family), seed=0)


def _load(directory):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoProcessor.from_pretrained(directory), AutoModelForImageTextToText.from_pretrained(
        directory
    )


def _blank_if_missing(image):
    return image if image is not None else Image.new("RGB", (64, 64))


def _user(image, text):
    return {
        "role": "user",
        "content": [
            {"type": "image", "image": _blank_if_missing(image)},
            {"type": "text", "text": text},
        ],
    }


def _training_batch(processor, triples):
    """Right-padded batch, labels on assistant tokens, PaliGemma's suffix token types."""
    processor.tokenizer.padding_side = "right"
    conversations = [
        [
            _user(image, question),
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
        for image, question, answer in triples
    ]
    batch = processor.apply_chat_template(
        conversations,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        processor_kwargs={"padding": True},
        return_tensors="pt",
    )
    mask = batch.pop("assistant_masks").bool()
    batch.pop("labels", None)
    if "token_type_ids" in batch:
        batch["token_type_ids"] = (mask.cumsum(1) > 0).long()
    batch["labels"] = batch["input_ids"].where(mask, -100)
    return batch, mask


def _generation_batch(processor, pairs):
    processor.tokenizer.padding_side = "left"
    batch = processor.apply_chat_template(
        [[_user(image, question)] for image, question in pairs],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        processor_kwargs={"padding": True},
        return_tensors="pt",
    )
    batch.pop("labels", None)
    return batch


def test_saved_directory_loads_back(vlm):
    family, directory = vlm
    processor, model = _load(directory)
    assert type(model).__name__.lower().startswith(family)
    assert type(processor).__name__.lower().startswith(family)
    assert "{% generation %}" in processor.chat_template
    assert model.generation_config.eos_token_id == processor.tokenizer.eos_token_id
    assert model.get_input_embeddings().num_embeddings >= len(processor.tokenizer)


def test_seed_fixes_the_weights(tmp_path):
    first = build_tiny_vlm("llava", tmp_path / "a", seed=3)
    second = build_tiny_vlm("llava", tmp_path / "b", seed=3)
    other = build_tiny_vlm("llava", tmp_path / "c", seed=4)
    states = [_load(path)[1].state_dict() for path in (first, second, other)]
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])
    assert not all(torch.equal(states[0][key], states[2][key]) for key in states[0])


def test_training_batch_masks_the_answer_and_lora_trains(vlm):
    from peft import LoraConfig, get_peft_model

    processor, model = _load(vlm[1])
    batch, mask = _training_batch(processor, TRIPLES)
    eot = processor.tokenizer.eos_token
    for row, (_, _, answer) in enumerate(TRIPLES):
        masked = batch["input_ids"][row][mask[row]]
        assert processor.tokenizer.decode(masked) == answer + eot

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    wrapped = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    assert len(wrapped) == 8  # q and v in 2 vision + 2 language layers
    model.train()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_B" in n}
    assert len(grads) == 8
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_sample_without_image(vlm):
    """LLaVA and Idefics3 batch a text-only sample with image samples; PaliGemma needs images."""
    family, directory = vlm
    processor, model = _load(directory)
    conversations = [
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        [{"role": "user", "content": [{"type": "image", "image": TRIPLES[0][0]}]}],
    ]
    kwargs = {"tokenize": True, "return_dict": True, "add_generation_prompt": True}
    if family == "paligemma":
        with pytest.raises(ValueError, match="images"):
            processor.apply_chat_template(conversations[:1], **kwargs)
        return
    batch = processor.apply_chat_template(
        conversations, processor_kwargs={"padding": True}, return_tensors="pt", **kwargs
    )
    expected = 1 if family == "llava" else 2  # idefics3 pads the missing image with zeros
    assert batch["pixel_values"].shape[0] == expected
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


def test_paligemma_token_types_keep_the_answer_causal(tmp_path):
    processor, model = _load(build_tiny_vlm("paligemma", tmp_path))
    batch, mask = _training_batch(processor, TRIPLES[:1])
    batch.pop("labels")
    last = int(mask[0].nonzero()[-2])  # the answer's last text token, before the end token
    altered = dict(batch, input_ids=batch["input_ids"].clone())
    other = processor.tokenizer.encode(" dog", add_special_tokens=False)[0]
    assert other != int(batch["input_ids"][0, last])
    altered["input_ids"][0, last] = other
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits[0, :last]
        after = model(**altered).logits[0, :last]
    assert torch.equal(before, after)


def test_generate_returns_new_tokens(vlm):
    from peft import LoraConfig, get_peft_model

    processor, model = _load(vlm[1])
    pairs = [(image, question) for image, question, _ in TRIPLES]
    batch = _generation_batch(processor, pairs)
    for row in batch["input_ids"]:
        prompt = processor.tokenizer.decode(row, skip_special_tokens=True)
        assert prompt.endswith("Assistant:\n")
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)).eval()
    single = _generation_batch(processor, pairs[1:2])
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
        alone = model.generate(**single, max_new_tokens=8, do_sample=False)
    width = batch["input_ids"].shape[1]
    assert torch.equal(out[:, :width], batch["input_ids"])
    new = out[:, width:]
    assert new.shape[0] == len(pairs) and 1 <= new.shape[1] <= 8
    assert len(processor.batch_decode(new, skip_special_tokens=True)) == len(pairs)
    # left padding leaves a sample's greedy continuation unchanged
    alone_new = alone[0, single["input_ids"].shape[1] :]
    assert torch.equal(new[1, : alone_new.shape[0]], alone_new)
