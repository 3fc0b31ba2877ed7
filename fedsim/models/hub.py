"""Hugging Face model sources: checks that a hub id or local path names a model config.

Light on purpose: transformers is imported inside the function, so the pre-flight checks can
call it before a run pays for the model.
"""

from __future__ import annotations

from fedsim.config import ConfigError
from fedsim.errors import one_line


def check_hf_config(name_or_path: str, key: str):
    """Read a Hugging Face model's config (not its weights): the model can be found.

    Returns:
        The config (a ``transformers.PretrainedConfig``).

    Raises:
        ConfigError: naming ``key`` and why the config cannot be read.
    """
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(
            key, f"cannot read a model config from {name_or_path!r}: {one_line(exc)}"
        ) from None
