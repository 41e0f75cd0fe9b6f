"""What ``sstoken eval`` and ``sstoken compare`` score: a run directory (its base model with the adapter merged), a
model path, or the embedded model."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from sstoken.errors import ConfigError


# --------------------------------------------------------------------------------------------- loading
@dataclass
class EvalTarget:
    """What ``sstoken eval`` scores: a model path, optionally with a PEFT adapter on top."""

    model: str | None
    adapter: str | None
    tokenizer: str | None


def resolve_target(target: str | None, adapter: str | None = None) -> EvalTarget:
    """A run directory (adapter + summary.json from ``sstoken train``), a model path, or the embedded model."""
    if target in (None, "", "embedded"):
        return EvalTarget(None, adapter, None)
    path = Path(target).expanduser()
    if path.is_dir() and (path / "adapter_config.json").is_file():
        base = None
        summary = path / "summary.json"
        if summary.is_file():
            try:
                base = json.loads(summary.read_text(encoding="utf-8")).get("model")
            except ValueError:
                base = None
        if base is None or "(embedded)" in str(base):
            config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
            base = None if base and "(embedded)" in str(base) else config.get("base_model_name_or_path")
        tokenizer = str(path) if (path / "tokenizer_config.json").is_file() else None
        return EvalTarget(base, str(path), tokenizer)
    if not path.exists() and os.sep in str(target):
        raise ConfigError(f"eval target {target} does not exist")
    return EvalTarget(str(target), adapter, None)


def load_for_eval(target: EvalTarget, dtype: str | None = None):
    """(model in eval mode with the adapter merged, tokenizer)."""
    from sstoken.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(target.tokenizer or target.model)
    model = load_model(target.model, dtype)
    if target.adapter:
        from sstoken.models import load_adapter

        model = load_adapter(model, target.adapter).merge_and_unload()
    model.eval()
    return model, tokenizer
