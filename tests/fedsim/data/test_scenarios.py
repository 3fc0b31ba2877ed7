"""FedMLLM's multimodal scenarios and the ``fedsim partition`` report."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.cli import main
from fedsim.config import ConfigError
from fedsim.config.checks import parse_ratio
from fedsim.data.federated import FederatedData, load_dataset
from fedsim.data.partition import (
    cross_image_clients,
    hybrid_modalities,
    missing_per_sample,
)


def _data(make_config, *overrides) -> FederatedData:
    cfg = make_config(*overrides)
    return FederatedData(cfg, load_dataset(cfg))


def _masks(data: FederatedData):
    for c in data.clients:
        for split in (c.train, c.holdout):
            yield c.client_id, split.mask


def test_missing_per_sample_rates_are_independent_and_seeded():
    m = missing_per_sample(20000, 0.3, seed=0, client=1)
    assert abs((~m.image).mean() - 0.3) < 0.02 and abs((~m.text).mean() - 0.3) < 0.02
    assert abs((~m.image & ~m.text).mean() - 0.09) < 0.01  # both may go: 0.3 * 0.3
    again = missing_per_sample(20000, 0.3, seed=0, client=1)
    assert np.array_equal(m.image, again.image) and np.array_equal(m.text, again.text)


@pytest.mark.parametrize(("ratio", "share"), [("3:7", 0.3), ("5:5", 0.5), ("7:3", 0.7)])
def test_cross_ratio_sets_the_image_only_share(ratio, share):
    assert parse_ratio(ratio) == pytest.approx(share)
    image_only = cross_image_clients(10, share, seed=0)
    assert image_only.sum() == round(share * 10)


@pytest.mark.parametrize("typed", ["3:7", "'3:7'", "0.3"])
def test_cross_ratio_from_the_command_line(make_config, typed):
    # unquoted, YAML 1.1 reads 3:7 as the base-60 number 187
    cfg = make_config("data.scenario=cross", f"data.cross_ratio={typed}")
    assert parse_ratio(cfg.data.cross_ratio) == pytest.approx(0.3)


@pytest.mark.parametrize("bad", ["3-7", "1.5", "0:0"])
def test_bad_cross_ratio_is_a_config_error(make_config, bad):
    with pytest.raises(ConfigError) as info:
        make_config("data.scenario=cross", f"data.cross_ratio={bad}")
    assert info.value.key == "data.cross_ratio"


def test_hybrid_never_leaves_a_client_without_a_modality():
    draws = [hybrid_modalities(0.1, seed=0, client=c) for c in range(500)]
    assert all(image or text for image, text in draws)
    kept_both = np.mean([image and text for image, text in draws])
    assert kept_both < 0.05  # p = 0.1: both survive with probability 0.01


def test_aligned_keeps_everything(make_config):
    for _, mask in _masks(_data(make_config, "data.scenario=aligned")):
        assert mask.image.all() and mask.text.all()


def test_cross_clients_hold_one_modality_each(make_config):
    data = _data(make_config, "data.scenario=cross", "data.cross_ratio=1:1")
    kinds = set()
    for _, mask in _masks(data):
        assert mask.image.all() != mask.text.all() or len(mask.image) == 0
        kinds.add(bool(mask.image.all()))
    assert kinds == {True, False}
    assert data.test.mask.image.all() and data.test.mask.text.all()  # global test complete


def test_hybrid_is_per_client(make_config):
    data = _data(make_config, "data.scenario=hybrid", "data.hybrid_p=0.6")
    for _, mask in _masks(data):
        assert len(set(mask.image.tolist())) <= 1 and len(set(mask.text.tolist())) <= 1
        assert mask.image.any() or mask.text.any()


def test_fedilora_scenario_loses_exactly_one(make_config):
    data = _data(make_config, "data.scenario=fedilora", "data.missing_rate=0.5")
    for _, mask in _masks(data):
        assert not (~mask.image & ~mask.text).any()


def test_partition_command_prints_a_table_and_saves_a_heatmap(make_config, tmp_path, capsys):
    # the tiny config's overrides, as a user would type them
    cfg = make_config("data.scenario=missing")
    overrides = [
        f"data.cache_dir={cfg.data.cache_dir}",
        f"data.image_size={cfg.data.image_size}",
        f"data.subset={cfg.data.subset}",
        f"data.min_per_client={cfg.data.min_per_client}",
        f"clients.num={cfg.clients.num}",
        "clients.ranks=[8,8,4,4,2,2]",
        "data.scenario=missing",
    ]
    png = tmp_path / "split.png"
    assert main(["partition", *overrides, "--heatmap", str(png)]) == 0
    out = capsys.readouterr().out
    assert "image only" in out and "neither" in out
    assert png.is_file() and png.stat().st_size > 1000
    assert main(["partition", "data.scenario=sideways"]) == 2


@pytest.mark.parametrize(
    ("image_fill", "text_fill"), [("learned", "placeholder"), ("mask", "mask"), ("zeros", "mask")]
)
def test_fill_policies_train_and_the_learned_embedding_is_federated(
    make_config, image_fill, text_fill
):
    import torch

    from actors.client import ClientWorker
    from fedsim.messages import Broadcast, ClientTask

    threads = torch.get_num_threads()
    cfg = make_config(
        "data.scenario=missing",
        "data.missing_beta=0.5",
        f"data.image_fill={image_fill}",
        f"data.text_fill={text_fill}",
        "train.local_epochs=2",
    )
    worker = ClientWorker(cfg)
    initial = worker.initial_global()
    has_learned = any(".missing_image." in k for k in initial)
    assert has_learned == (image_fill == "learned")
    report, upload, _ = worker.train(ClientTask(0, 8, 1), Broadcast(adapter=initial))
    torch.set_num_threads(threads)
    assert np.isfinite(report.train_loss)
    if has_learned:  # trained and uploaded like the head
        key = next(k for k in upload.update if ".missing_image." in k)
        assert not torch.equal(upload.update[key], initial[key])


def test_mask_fill_ignores_the_missing_modality_content():
    import torch

    from fedsim.config import ModelConfig
    from fedsim.models.backbone import build_backbone

    model = build_backbone(ModelConfig(backbone="tiny"), 3, 0, "mask", "mask").model.eval()
    ids = torch.tensor([[101, 2000, 102]])
    attn = torch.ones_like(ids)
    no = torch.tensor([False])
    a = model(torch.rand(1, 3, 16, 16), ids, attn, has_image=no, has_text=torch.tensor([True]))
    b = model(torch.rand(1, 3, 16, 16), ids, attn, has_image=no, has_text=torch.tensor([True]))
    assert torch.allclose(a, b)  # the image content does not matter when it is missing
