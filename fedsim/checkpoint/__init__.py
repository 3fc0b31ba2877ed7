"""Per-round checkpoints: writing them atomically, reading them back, verifying their format.

- :mod:`~fedsim.checkpoint.disk`: :class:`~fedsim.checkpoint.disk.CheckpointWriter` (a
  background thread), :func:`~fedsim.checkpoint.disk.load_checkpoint` and the resume rules;
- :mod:`~fedsim.checkpoint.format`: the on-disk format (safetensors and JSON, never pickle) and
  the checks that a checkpoint read back is one fedsim wrote.

May import :mod:`fedsim.config` only.
"""
