"""The public entry points: `ktjax.load` and friends."""

from __future__ import annotations

import os
from typing import Any

from ktjax import loading
from ktjax.tokenizer import load_tokenizer



def default_model_path() -> str:
    """The embedded default model shipped in the package (models/tiny)."""
    import ktjax.models
    return os.path.join(os.path.dirname(os.path.abspath(ktjax.models.__file__)), "tiny")


def load(path: str | os.PathLike | None = None, *, dtype: Any = None, **options: Any) -> loading.Model:
    """Load a transformers-format DeepSeek checkpoint directory (the embedded tiny model if None)."""
    path = default_model_path() if path is None else os.fspath(path)
    model = loading.load(path, dtype=dtype, **options)
    model.tokenizer = load_tokenizer(path)
    return model
