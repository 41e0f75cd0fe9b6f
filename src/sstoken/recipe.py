"""YAML recipes: the CLI's configuration, validated before any model is loaded.

A recipe holds the run's own keys (model, data, LoRA, …) and any field of :class:`SSTokenConfig` (which
includes every TRL ``SFTConfig`` / transformers ``TrainingArguments`` field). Command-line flags override
the file, as with ``trl sft``: ``sstoken train --config r.yaml --rho 0.5 --max_steps 10``.
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

import yaml

from sstoken.errors import ConfigError

DEMO_RECIPE = Path(__file__).parent / "demo" / "demo.yaml"

# Keys of the run itself, with defaults; everything else must be an SSTokenConfig field.
RUN_KEYS: dict[str, Any] = {
    "model": None,  # None: the embedded SmolLM2-135M-Instruct
    "data": None,
    "eval_data": None,
    "max_seq_length": 1024,
    "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
    "dtype": "auto",
    "attn_implementation": "sdpa",
    "trust_remote_code": False,
    "cache_batch_size": 8,
    "plots": True,
}
LORA_KEYS = {"r", "alpha", "dropout", "target_modules"}


def config_fields() -> dict[str, dataclasses.Field]:
    from sstoken.trainer import SSTokenConfig

    return {f.name: f for f in dataclasses.fields(SSTokenConfig) if f.init}


def _did_you_mean(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_recipe(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        path = DEMO_RECIPE
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the recipe must be a mapping of keys to values")
    recipe = dict(data)
    base = path.parent
    for key in ("data", "eval_data"):  # relative data paths are relative to the recipe
        if isinstance(recipe.get(key), str) and not Path(recipe[key]).is_absolute():
            candidate = base / recipe[key]
            if candidate.exists():
                recipe[key] = str(candidate)
    if path == DEMO_RECIPE and isinstance(recipe.get("data"), str):
        recipe["data"] = str(base / recipe["data"])
    return recipe


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """``--key value`` / ``--key=value`` pairs; values parsed as YAML scalars (numbers, booleans, null)."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}; overrides are written --key value")
        key = token[2:].replace("-", "_")
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            raw = tokens[i + 1]
            i += 2
        else:
            raw = "true"
            i += 1
        try:
            overrides[key] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            overrides[key] = raw
    return overrides


def split_recipe(recipe: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run settings with defaults filled in, SSTokenConfig kwargs); unknown keys are an error."""
    fields = config_fields()
    run = {key: value for key, value in RUN_KEYS.items()}
    run["lora"] = dict(RUN_KEYS["lora"])
    config: dict[str, Any] = {}
    for key, value in recipe.items():
        if key in RUN_KEYS:
            if key == "lora" and value not in (None, False):
                if value is True:
                    value = {}
                if not isinstance(value, dict):
                    raise ConfigError("lora must be a mapping (r, alpha, dropout, target_modules), or null for "
                                      "full fine-tuning")
                unknown = set(value) - LORA_KEYS
                if unknown:
                    bad = sorted(unknown)[0]
                    raise ConfigError(f"unknown lora key {bad!r}{_did_you_mean(bad, LORA_KEYS)}")
                value = {**RUN_KEYS["lora"], **value}
            run[key] = value
        elif key in fields:
            config[key] = value
        elif key in ("max_length",):
            run["max_seq_length"] = value
        else:
            raise ConfigError(f"unknown config key {key!r}{_did_you_mean(key, list(RUN_KEYS) + list(fields))}")
    if not isinstance(run["max_seq_length"], int) or run["max_seq_length"] < 2:
        raise ConfigError(f"max_seq_length must be an integer >= 2, got {run['max_seq_length']!r}")
    config["max_length"] = run["max_seq_length"]
    return run, config


def build_config(config_kwargs: dict[str, Any]):
    """SSTokenConfig from recipe values, turning type errors into ConfigError."""
    from sstoken.trainer import SSTokenConfig

    kwargs = dict(config_kwargs)
    kwargs.setdefault("output_dir", "runs/sstoken")
    try:
        return SSTokenConfig(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid training setting: {exc}") from exc
