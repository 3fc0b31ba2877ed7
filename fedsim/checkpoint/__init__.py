"""Per-round checkpoints: writing them atomically, reading them back, verifying their format.

- :mod:`~fedsim.checkpoint.store`: :class:`~fedsim.checkpoint.store.CheckpointWriter` (a
  background thread), :func:`~fedsim.checkpoint.store.load_checkpoint` and the resume rules;
- :mod:`~fedsim.checkpoint.format`: the on-disk format (safetensors and JSON, never pickle) and
  the checks that a checkpoint read back is one fedsim wrote.

May import :mod:`fedsim.config` only.
"""
