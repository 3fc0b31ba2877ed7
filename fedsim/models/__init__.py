"""Backbones (text tower + image tower + fusion head) and their LoRA adapters."""
