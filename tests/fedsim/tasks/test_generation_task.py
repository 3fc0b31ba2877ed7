"""The generation task's pieces: chat codecs (loss mask, padding), the built-in projected VLM,
prompts, label metrics, the combination of evaluation shards and capped evaluation splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vlm_builders import FAMILIES, build_tiny_vlm

from fedsim.data.federated import Split
from fedsim.data.partition import ModalityMask
from fedsim.models.vlm import IGNORE, DemoChatCodec, HFChatCodec, ProjectedVLM, Sample
from fedsim.tasks import combine_parts
from fedsim.tasks.generation import AGNOSTIC_SUFFIX, GenerationPart, PromptBuilder, label_metrics
from fedsim.tasks.text_metrics import generation_metrics


def _image(seed: int) -> torch.Tensor:
    """A random ``(3, 64, 64)`` uint8 image."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g)


def _samples(family: str) -> list[Sample]:
    """Three samples with answers of different lengths; the second has no image where the
    family's processor allows it (PaliGemma needs an image in every sample)."""
    second = _image(2) if family == "paligemma" else None
    return [
        Sample(_image(1), "what is it?", "a red flag"),
        Sample(second, "the face", "a smiling cat, 42."),
        Sample(_image(3), "and this one?", "no"),
    ]


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory) -> dict:
    """A tiny random model with its processor per family, built once for this module."""
    root = tmp_path_factory.mktemp("tiny-vlms")
    return {family: build_tiny_vlm(family, root / family) for family in FAMILIES}


def _to_pil(image: torch.Tensor):
    """A ``(3, H, W)`` uint8 tensor as the RGB PIL image a processor takes."""
    from PIL import Image

    return Image.fromarray(image.permute(1, 2, 0).numpy())


def _processor(directory):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(directory)


def _reference(processor, samples: list[Sample]) -> dict:
    """The processor's own training encoding of the full conversations, with the
    chat template's assistant mask."""
    processor.tokenizer.padding_side = "right"
    convs = []
    for s in samples:
        content = [{"type": "image", "image": _to_pil(s.image)}] if s.image is not None else []
        content.append({"type": "text", "text": s.text})
        convs.append(
            [
                {"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text", "text": s.answer}]},
            ]
        )
    return processor.apply_chat_template(
        convs,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        processor_kwargs={"padding": True},
        return_tensors="pt",
    )


# --- HFChatCodec -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_mask_is_exactly_the_assistant_tokens(vlm_dirs, family):
    samples = _samples(family)
    codec = HFChatCodec(_processor(vlm_dirs[family]))
    enc = codec.encode_train(samples)
    ref = _reference(_processor(vlm_dirs[family]), samples)
    tok = codec.tokenizer
    assert enc["labels"].shape == enc["input_ids"].shape == enc["attention_mask"].shape
    lengths = enc["attention_mask"].sum(1).tolist()
    answer_lengths = [len(tok(s.answer, add_special_tokens=False)["input_ids"]) for s in samples]
    assert len(set(answer_lengths)) == 3  # the batch really pads answers of different lengths
    for i, s in enumerate(samples):
        n = lengths[i]
        labelled = (enc["labels"][i] != IGNORE).nonzero().flatten().tolist()
        assistant = ref["assistant_masks"][i].nonzero().flatten().tolist()
        # the same positions: the codec's row is the reference's row up to the end token
        assert labelled == assistant
        assert enc["input_ids"][i, :n].tolist() == ref["input_ids"][i, :n].tolist()
        assert labelled == list(range(n - answer_lengths[i] - 1, n))  # answer + eos, at the end
        # the labels are the ids they stand on, and those are the reference's assistant ids
        label_ids = enc["labels"][i][enc["labels"][i] != IGNORE]
        assert label_ids.tolist() == enc["input_ids"][i, labelled].tolist()
        assert label_ids.tolist() == ref["input_ids"][i][ref["assistant_masks"][i] == 1].tolist()
        assert tok.decode(label_ids) == s.answer + tok.eos_token
        # right padding: attention 1 then 0, pad ids and ignored labels on the padding
        assert enc["attention_mask"][i].tolist() == [1] * n + [0] * (enc["labels"].shape[1] - n)
        assert (enc["input_ids"][i, n:] == codec.pad_id).all()
        assert (enc["labels"][i, n:] == IGNORE).all()
    pixel_keys = {"pixel_values", "pixel_attention_mask"} & set(ref)
    assert pixel_keys == ({"pixel_values", "pixel_attention_mask"} & set(enc))
    assert all(torch.equal(enc[k], ref[k]) for k in pixel_keys)
    assert "assistant_masks" not in enc


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_prompt_is_left_padded_prompt_of_the_training_row(vlm_dirs, family):
    samples = _samples(family)
    codec = HFChatCodec(_processor(vlm_dirs[family]))
    train = codec.encode_train(samples)
    prompt = codec.encode_prompt(samples)
    assert "labels" not in prompt
    width = prompt["input_ids"].shape[1]
    lengths = prompt["attention_mask"].sum(1).tolist()
    assert max(lengths) == width and len(set(lengths)) > 1  # some rows really are padded
    for i in range(len(samples)):
        n = lengths[i]
        assert prompt["attention_mask"][i].tolist() == [0] * (width - n) + [1] * n
        assert (prompt["input_ids"][i, : width - n] == codec.pad_id).all()
        train_prompt = train["input_ids"][i][
            (train["labels"][i] == IGNORE) & (train["attention_mask"][i] == 1)
        ]
        assert prompt["input_ids"][i, width - n :].tolist() == train_prompt.tolist()
        assert codec.tokenizer.decode(train_prompt).endswith("Assistant:\n")
    assert torch.equal(prompt["pixel_values"], train["pixel_values"])


def test_paligemma_token_types_mark_the_answer(vlm_dirs):
    samples = _samples("paligemma")
    codec = HFChatCodec(_processor(vlm_dirs["paligemma"]))
    train = codec.encode_train(samples)
    types, labels, attn = train["token_type_ids"], train["labels"], train["attention_mask"] == 1
    assert types.shape == labels.shape
    for i in range(len(samples)):
        # 0 on the image and the prompt, 1 on every answer token (its end token included)
        assert types[i][attn[i]].tolist() == (labels[i][attn[i]] != IGNORE).long().tolist()
        assert int(types[i][attn[i]].sum()) == int((labels[i] != IGNORE).sum()) > 0
    prompt = codec.encode_prompt(samples)
    # the generation prompt is all prefix: type 0 everywhere (generate types new tokens 1)
    assert prompt["token_type_ids"].shape == prompt["input_ids"].shape
    assert (prompt["token_type_ids"] == 0).all()


def test_paligemma_prompt_without_image_is_a_config_error(vlm_dirs):
    from fedsim.config import ConfigError

    codec = HFChatCodec(_processor(vlm_dirs["paligemma"]))
    with pytest.raises(ConfigError) as info:
        codec.encode_train([Sample(None, "hi", "yes")])
    assert info.value.key == "data.image_fill"


# --- ProjectedVLM + DemoChatCodec ------------------------------------------------------------

# tiny_lite's stem and two stages each halve the image: stride 8, not Lite0's 32
TINY_LITE_STRIDE = 8


@pytest.fixture(scope="module")
def demo(vlm_dirs):
    """(model, codec) of a tiny random ProjectedVLM on a tiny Llama and tiny_lite."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedsim.models.efficientnet_lite import tiny_lite

    tok = _processor(vlm_dirs["llava"]).tokenizer
    with torch.random.fork_rng():
        torch.manual_seed(0)
        lm = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tok),
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                intermediate_size=64,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id,
            )
        )
        vision = tiny_lite()
        image_token_id = tok.convert_tokens_to_ids("<image>")
        model = ProjectedVLM(vision, vision.out_dim, lm, image_token_id).eval()
    return model, DemoChatCodec(tok, image_token_id, stride=TINY_LITE_STRIDE)


def test_tiny_lite_stride_matches_the_codec():
    from fedsim.models.efficientnet_lite import tiny_lite

    fmap = tiny_lite().eval().feature_map(torch.zeros(1, 3, 64, 64))
    assert fmap.shape == (1, 64, 64 // TINY_LITE_STRIDE, 64 // TINY_LITE_STRIDE)


def test_demo_codec_gives_one_slot_per_feature(demo):
    model, codec = demo
    samples = _samples("llava")  # the second sample has no image
    enc = codec.encode_train(samples)
    slots = (enc["input_ids"] == codec.image_token_id).sum(1).tolist()
    with torch.no_grad():
        features = model.image_features(enc["pixel_values"])
    assert enc["pixel_values"].shape == (2, 3, 64, 64)  # one row per image present
    assert features.shape == (2, 64, 32)
    assert slots == [features.shape[1], 0, features.shape[1]]
    expected = torch.stack([samples[0].image, samples[2].image]).float() / 255.0 * 2 - 1
    assert torch.allclose(enc["pixel_values"], expected)
    tok = codec.tokenizer
    for i, s in enumerate(samples):
        label_ids = enc["labels"][i][enc["labels"][i] != IGNORE]
        assert tok.decode(label_ids) == s.answer + tok.eos_token
        n = int(enc["attention_mask"][i].sum())
        text = tok.decode(enc["input_ids"][i, :n][enc["input_ids"][i, :n] != codec.image_token_id])
        assert text == (
            f"<|im_start|>user\n{s.text}<|im_end|>\n<|im_start|>assistant\n{s.answer}<|end|>"
        )


def test_projected_vlm_forward_uses_the_images(demo):
    model, codec = demo
    enc = codec.encode_train(_samples("llava"))
    model.zero_grad()
    out = model(**enc)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    model.zero_grad()
    with torch.no_grad():
        other = model(**{**enc, "pixel_values": torch.flip(enc["pixel_values"], dims=[0])})
        again = model(**enc)
    assert torch.equal(again.logits, out.logits.detach())
    assert not torch.equal(other.logits[0], out.logits[0].detach())  # sample 0 sees image 2
    # the image-free sample's own logits are untouched by the others' images
    assert torch.allclose(other.logits[1], out.logits[1].detach(), atol=1e-5)


def test_projected_vlm_rejects_slot_image_mismatch(demo):
    model, codec = demo
    enc = codec.encode_train([Sample(_image(1), "a", "b"), Sample(_image(2), "c", "d")])
    with pytest.raises(ValueError, match="^128 image slots in input_ids but 1 images of 64 "):
        model(enc["input_ids"], enc["attention_mask"], enc["pixel_values"][:1])
    three = torch.cat([enc["pixel_values"], enc["pixel_values"][:1]])
    with pytest.raises(ValueError, match="^128 image slots in input_ids but 3 images of 64 "):
        model(enc["input_ids"], enc["attention_mask"], three)


@pytest.mark.parametrize("case", ["slots_without_images", "images_without_slots"])
def test_projected_vlm_rejects_one_sided_mismatch(demo, case):
    model, codec = demo
    with_image = codec.encode_train([Sample(_image(1), "a", "b")])
    without = codec.encode_train([Sample(None, "a", "b")])
    with pytest.raises(ValueError), torch.no_grad():
        if case == "slots_without_images":
            model(with_image["input_ids"], with_image["attention_mask"])
        else:
            model(without["input_ids"], without["attention_mask"], with_image["pixel_values"])


def test_projected_vlm_generate_returns_prompt_then_new_ids(demo):
    model, codec = demo
    samples = _samples("llava")
    prompt = codec.encode_prompt(samples)
    width = prompt["input_ids"].shape[1]
    kwargs = {
        "max_new_tokens": 4,
        "min_new_tokens": 4,
        "do_sample": False,
        "pad_token_id": codec.pad_id,
        "eos_token_id": codec.tokenizer.eos_token_id,
    }
    out = model.generate(**prompt, **kwargs)
    assert out.shape == (3, width + 4)
    assert torch.equal(out[:, :width], prompt["input_ids"])
    with torch.no_grad():
        first = model(**prompt).logits[:, -1].argmax(-1)
    assert out[:, width].tolist() == first.tolist()  # greedy: the prompt's most likely next id
    # left padding leaves each sample's greedy continuation unchanged
    for i, s in enumerate(samples):
        alone = codec.encode_prompt([s])
        single = model.generate(**alone, **kwargs)
        assert single[0, alone["input_ids"].shape[1] :].tolist() == out[i, width:].tolist()
    assert len(codec.decode_new(out, width)) == 3


def test_projected_vlm_train_keeps_the_vision_tower_in_eval(demo):
    model, _ = demo
    try:
        model.train()
        assert model.training and model.lm.training and model.projector.training
        assert not any(m.training for m in model.vision.modules())
    finally:
        model.eval()
    assert not any(m.training for m in model.modules())


# --- PromptBuilder ---------------------------------------------------------------------------

MEME = ("Is this meme hateful?", "Text")
CHOICES = ["not hateful", "hateful"]
LIST = "Answer with one of: not hateful, hateful."


@pytest.mark.parametrize(
    "style, fill, placeholder, text, has_image, has_text, expected",
    [
        ("default", "placeholder", "none", "love all", True, True,
         f"Is this meme hateful? {LIST} Text: love all. Use the image and the text."),
        ("agnostic", "placeholder", "none", "love all", True, True,
         f"Is this meme hateful? {LIST} Text: love all. {AGNOSTIC_SUFFIX}"),
        ("default", "placeholder", "none", "Really? ", False, True,
         f"Is this meme hateful? {LIST} Text: Really? Use the text."),
        # a missing text: the placeholder in its place (the row's own text is never shown)
        ("default", "placeholder", "no text", "secret", True, False,
         f"Is this meme hateful? {LIST} Text: no text. Use the image."),
        ("agnostic", "placeholder", "no text", "secret", True, False,
         f"Is this meme hateful? {LIST} Text: no text. {AGNOSTIC_SUFFIX}"),
        # an empty placeholder leaves the text line out
        ("default", "placeholder", "", "secret", True, False,
         f"Is this meme hateful? {LIST} Use the image."),
        ("default", "mask", "no text", "secret", True, False,
         f"Is this meme hateful? {LIST} Use the image."),
        ("agnostic", "mask", "no text", "secret", False, False,
         f"Is this meme hateful? {LIST} {AGNOSTIC_SUFFIX}"),
        ("default", "mask", "no text", "secret", False, False,
         f"Is this meme hateful? {LIST}"),
    ],
)  # fmt: skip
def test_prompt_builder(style, fill, placeholder, text, has_image, has_text, expected):
    build = PromptBuilder(*MEME, style, fill, placeholder, CHOICES)
    assert build(text, has_image, has_text) == expected


def test_prompt_builder_caption_task_lists_no_choices():
    build = PromptBuilder("What is the name of this emoji?", "Hint", "default", "mask", "")
    assert build("a face", True, True) == (
        "What is the name of this emoji? Hint: a face. Use the image and the text."
    )


def test_prompt_builder_verbatim_leaves_a_posed_instruction_unchanged():
    build = PromptBuilder(*MEME, "verbatim", "placeholder", "", CHOICES)
    assert build("love all", True, True) == f"Is this meme hateful? {LIST} Text: love all."
    with pytest.raises(ValueError, match="allowed: default, modality, agnostic, verbatim"):
        PromptBuilder(*MEME, "loud", "placeholder", "", CHOICES)


@pytest.mark.parametrize(
    "style, fill, placeholder, has_image, has_text, expected",
    [
        # by default a conversation's instruction reaches the model as the data wrote it
        ("default", "placeholder", "", True, True, "Describe the cat."),
        ("verbatim", "placeholder", "", True, True, "Describe the cat."),
        ("default", "placeholder", "Describe it.", True, False, "Describe it."),
        ("default", "mask", "Describe it.", True, False, ""),
        # the modality phrase and FedMLLM's suffix stay options
        ("modality", "placeholder", "", True, True,
         "Describe the cat. Use the image and the text."),
        ("agnostic", "placeholder", "", True, True, f"Describe the cat. {AGNOSTIC_SUFFIX}"),
        ("modality", "placeholder", "Describe it.", True, False, "Describe it. Use the image."),
        ("modality", "mask", "Describe it.", True, False, "Use the image."),
        ("agnostic", "mask", "", False, False, AGNOSTIC_SUFFIX),
    ],
)  # fmt: skip
def test_prompt_builder_llava_text_is_the_instruction(
    style, fill, placeholder, has_image, has_text, expected
):
    build = PromptBuilder(None, "Text", style, fill, placeholder)
    assert build("Describe the cat.", has_image, has_text) == expected


# --- label_metrics ---------------------------------------------------------------------------


def test_label_metrics_three_classes_with_an_unmatched_answer():
    choices = ["cat", "dog", "bird"]
    labels = np.array([0, 0, 1, 1, 2, 2])
    predictions = ["cat", "Dog.", " DOG ", "a fish", "bird!", "cat"]  # pred 0 1 1 -1 2 0
    out = label_metrics(predictions, labels, np.zeros((6, 3)), choices)
    # per class (tp, fp, fn): cat (1, 1, 1) F1 1/2; dog (1, 1, 1) F1 1/2; bird (1, 0, 1) F1 2/3
    # the unmatched answer is a miss for "dog", not a fourth class (that would give 5/12)
    assert out["accuracy"] == pytest.approx(3 / 6)
    assert out["macro_f1"] == pytest.approx((1 / 2 + 1 / 2 + 2 / 3) / 3)
    assert out["answer_valid"] == pytest.approx(5 / 6)
    assert "auc" not in out  # three classes


def test_label_metrics_class_only_predicted_counts_in_macro_f1():
    labels = np.array([0, 0, 1])
    out = label_metrics(["yes", "maybe", "no"], labels, np.zeros((3, 3)), ["yes", "no", "maybe"])
    # yes (1, 0, 1) 2/3; no (1, 0, 0) 1; maybe (0, 1, 0) 0
    assert out["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert out["accuracy"] == pytest.approx(2 / 3)


def test_label_metrics_binary_normalised_answers_and_auc():
    choices = ["not hateful", "hateful"]
    labels = np.array([1, 1, 1, 0, 0])
    predictions = ["Hateful.", "hateful", "  Not  Hateful ", "not hateful!", "HATEFUL"]
    # per row (log p(not hateful), log p(hateful)); softmax ranks by the difference
    # positives: 2.0, 0.2, -0.5; negatives: 0.5, -1.0
    scores = np.array([[-5.0, -3.0], [-1.0, -0.8], [-0.5, -1.0], [-2.5, -2.0], [-3.2, -4.2]])
    out = label_metrics(predictions, labels, scores, choices)
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["answer_valid"] == 1.0
    # hateful (2, 1, 1) F1 2/3; not hateful (1, 1, 1) F1 1/2
    assert out["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    # correctly ordered (positive, negative) pairs: 2.0 > both, 0.2 > -1.0, -0.5 > -1.0: 4 of 6
    # (ranking by the raw hateful log-likelihood instead would give 5 of 6)
    assert out["auc"] == pytest.approx(4 / 6)


def test_label_metrics_auc_needs_both_classes():
    out = label_metrics(["no", "no"], np.array([0, 0]), np.zeros((2, 2)), ["no", "yes"])
    assert "auc" not in out and out["accuracy"] == 1.0


# --- GenerationPart.combine ------------------------------------------------------------------


def _part(rows, preds, refs, nll, tokens, labels, scores, examples=3) -> GenerationPart:
    return GenerationPart(
        rows=rows,
        predictions=preds,
        references=refs,
        prompts=[f"prompt {r}" for r in rows],
        refs=[f"img/{r}.png" for r in rows],
        nll=nll,
        tokens=tokens,
        labels=np.array(labels, dtype=np.int64),
        scores=np.array(scores, dtype=np.float64).reshape(len(rows), 2),
        choices=["no", "yes"],
        examples=examples,
    )


PREDS = ["yes", "no", "the cat sat", "yes", "no"]
REFS = ["yes", "yes", "no", "yes", "no"]
LABELS = [1, 1, 0, 1, 0]
SCORES = [[0.0, 1.0], [0.5, 0.2], [1.0, -1.0], [0.0, 0.3], [0.0, 0.1]]


def test_generation_parts_combine_like_one_shard():
    first = _part([4, 7], PREDS[:2], REFS[:2], 3.0, 4, LABELS[:2], SCORES[:2])
    second = _part([1, 9, 2], PREDS[2:], REFS[2:], 6.0, 6, LABELS[2:], SCORES[2:])
    whole = _part([4, 7, 1, 9, 2], PREDS, REFS, 9.0, 10, LABELS, SCORES)
    metrics, examples = GenerationPart.combine([first, second])
    assert metrics == GenerationPart.combine([whole])[0]
    expected = generation_metrics(PREDS, REFS)
    expected["loss"] = 9.0 / 10  # not the mean of the shards' 0.75 and 1.0
    expected.update(label_metrics(PREDS, np.array(LABELS), np.array(SCORES), ["no", "yes"]))
    assert metrics == expected
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["auc"] == pytest.approx(5 / 6)  # yes: 1.0, -0.3, 0.3; no: -2.0, 0.1
    # the first `examples` rows in shard order
    assert [e["image"] for e in examples] == ["img/4.png", "img/7.png", "img/1.png"]
    assert examples[2] == {
        "image": "img/1.png",
        "prompt": "prompt 1",
        "reference": "no",
        "output": "the cat sat",
        "rouge_l": 0.0,
    }
    assert [e["rouge_l"] for e in examples[:2]] == [1.0, 0.0]
    # combine_parts skips empty shards (a pool with more actors than batches)
    empty = _part([], [], [], 0.0, 0, [], [])
    assert combine_parts([empty, first, empty, second]) == (metrics, examples)


def test_generation_parts_examples_cap():
    first = _part([4, 7], PREDS[:2], REFS[:2], 3.0, 4, LABELS[:2], SCORES[:2], examples=1)
    second = _part([1, 9, 2], PREDS[2:], REFS[2:], 6.0, 6, LABELS[2:], SCORES[2:], examples=1)
    assert [e["image"] for e in GenerationPart.combine([first, second])[1]] == ["img/4.png"]
    first.examples = 4
    assert [e["image"] for e in GenerationPart.combine([first, second])[1]] == [
        "img/4.png",
        "img/7.png",
        "img/1.png",
        "img/9.png",
    ]
    first.examples = 0
    assert GenerationPart.combine([first, second])[1] == []


def test_generation_part_without_choices_has_no_label_metrics():
    part = GenerationPart([0, 1], ["a cat", "a dog"], ["a cat", "a bird"], ["p", "q"], ["x", "y"])
    part.nll, part.tokens = 6.0, 4
    metrics, examples = GenerationPart.combine([part])
    assert set(metrics) == {"bleu", "rouge_l", "cider", "exact_match", "loss"}
    assert metrics["exact_match"] == 0.5 and metrics["loss"] == 1.5
    assert len(examples) == 2


# --- Split.capped ----------------------------------------------------------------------------


def _split(n: int) -> Split:
    rows = np.random.default_rng(5).permutation(10 * n)[:n]  # not sorted: order is the split's
    return Split(rows, ModalityMask(rows % 2 == 0, rows % 3 == 0))


def test_capped_keeps_small_splits_whole():
    split = _split(20)
    assert split.capped(None, 0, 1) is split
    assert split.capped(20, 0, 1) is split
    assert split.capped(50, 0, 1) is split


def test_capped_subset_is_seeded_ordered_and_keeps_masks():
    split = _split(200)
    position = {int(r): p for p, r in enumerate(split.rows)}
    capped = split.capped(30, 0, 7, 1)
    assert len(capped) == 30 and len(set(capped.rows.tolist())) == 30
    positions = [position[int(r)] for r in capped.rows]  # every row is one of the split's
    assert positions == sorted(positions)  # in split order
    assert np.array_equal(capped.mask.image, capped.rows % 2 == 0)  # masks follow the rows
    assert np.array_equal(capped.mask.text, capped.rows % 3 == 0)
    assert np.array_equal(split.capped(30, 0, 7, 1).rows, capped.rows)  # same key, same rows
    for other in (split.capped(30, 0, 7, 2), split.capped(30, 1, 7, 1)):
        assert len(other) == 30 and not np.array_equal(other.rows, capped.rows)
