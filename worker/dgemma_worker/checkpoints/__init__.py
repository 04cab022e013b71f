"""Checkpoints that ship inside the package (package data), so `pip install` carries them."""

from __future__ import annotations

from pathlib import Path

# A ~3M-parameter DiffusionGemma trained on CPU by hack/train_tiny.py (docs/trained-model.md): the model
# `dgemma serve`, `dgemma generate` and `dgemma worker` use when none is given.
BUNDLED_MODEL_DIR = Path(__file__).resolve().parent / "dgemma-tiny"
