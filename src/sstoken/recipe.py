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
        overrides[key] = _scalar(raw)
    return overrides


# YAML 1.1 reads yes/no/on/off as booleans; transformers' strategies are spelled "no", "steps", ...
_YAML11_BOOLEAN_WORDS = {"yes", "no", "on", "off", "y", "n"}


def _scalar(raw: str) -> Any:
    if raw == "" or raw.strip().lower() in _YAML11_BOOLEAN_WORDS:
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


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
            if isinstance(value, bool) and key.endswith("_strategy"):
                value = "no" if value is False else value  # `save_strategy: no` read by YAML as false
            config[key] = value
        elif key in ("max_length",):
            run["max_seq_length"] = value
        else:
            raise ConfigError(f"unknown config key {key!r}{_did_you_mean(key, list(RUN_KEYS) + list(fields))}")
    if not isinstance(run["max_seq_length"], int) or run["max_seq_length"] < 2:
        raise ConfigError(f"max_seq_length must be an integer >= 2, got {run['max_seq_length']!r}")
    config["max_length"] = run["max_seq_length"]
    return run, config


# Counts that transformers only checks deep inside the training loop (a DataLoader refuses batch_size=0).
_POSITIVE_INTS = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps")
_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false"}


def _scalar_type(hint) -> tuple[type | None, bool]:
    """(int, float or bool when that is the field's only non-None type, else None; whether None is allowed)."""
    import types
    import typing

    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    allows_none = type(None) in args
    rest = [a for a in args if a is not type(None)]
    return (rest[0] if len(rest) == 1 and rest[0] in _TYPE_WORDS else None), allows_none


def check_value_types(config_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Check recipe numbers and booleans against SSTokenConfig's annotations; returns converted kwargs.

    YAML hands over whatever was written: ``max_steps: abc`` or ``learning_rate: [1]`` would otherwise reach
    transformers' training loop and fail there with a traceback, and ``rho: true`` would silently mean 1.
    PyYAML reads ``1e-4`` (no dot) as a string, so numeric strings are converted for number fields.
    """
    import typing

    from sstoken.trainer import SSTokenConfig

    hints = typing.get_type_hints(SSTokenConfig)
    out = dict(config_kwargs)
    for key, value in config_kwargs.items():
        expected, allows_none = _scalar_type(hints.get(key))
        if expected is None or (value is None and allows_none):
            continue
        converted = value
        if isinstance(value, bool) or value is None:
            ok = expected is bool and value is not None
        elif expected is bool:
            ok = False
        elif isinstance(value, str):
            try:
                converted = expected(value.strip())
                ok = True
            except ValueError:
                ok = False
        else:
            ok = isinstance(value, int) if expected is int else isinstance(value, (int, float))
        if not ok:
            raise ConfigError(f"{key} must be {_TYPE_WORDS[expected]}, got {value!r}")
        out[key] = converted
    for key in _POSITIVE_INTS:
        if key in out and out[key] < 1:
            raise ConfigError(f"{key} must be >= 1, got {out[key]}")
    return out


def build_config(config_kwargs: dict[str, Any]):
    """SSTokenConfig from recipe values, turning type errors into ConfigError."""
    from sstoken.trainer import SSTokenConfig

    kwargs = check_value_types(config_kwargs)
    kwargs.setdefault("output_dir", "runs/sstoken")
    try:
        return SSTokenConfig(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid training setting: {exc}") from exc
