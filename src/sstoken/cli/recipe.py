"""YAML recipes: the CLI's configuration, validated before any model is loaded.

A recipe holds the run's own keys (model, data, LoRA, …) and any field of :class:`SSTokenConfig` (which
includes every TRL ``SFTConfig`` / transformers ``TrainingArguments`` field). Command-line flags override
the file, as with ``trl sft``: ``sstoken train --config r.yaml --rho 0.5 --max_steps 10``.

LoRA is the ``lora:`` section (``r``, ``alpha``, ...) or, as in TRL's ``ModelConfig``, top-level ``lora_r``,
``lora_alpha``, ..., ``use_peft`` (:data:`TRL_LORA_KEYS`); QLoRA is TRL's ``load_in_4bit`` / ``load_in_8bit`` /
``bnb_4bit_*`` keys (:data:`sstoken.models.QUANTIZATION_DEFAULTS`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import yaml

from sstoken.demo import DEMO_RECIPE
from sstoken.errors import ConfigError, did_you_mean, shown

# Keys of the run itself, with defaults; everything else must be an SSTokenConfig field.
RUN_KEYS: dict[str, Any] = {
    "model": None,  # None: the embedded SmolLM2-135M-Instruct
    "data": None,
    "eval_data": None,
    "max_seq_length": 1024,
    "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear", "target_parameters": None,
             "modules_to_save": None, "use_rslora": False, "use_dora": False, "task_type": "CAUSAL_LM"},
    "dtype": "auto",
    "attn_implementation": "sdpa",
    "trust_remote_code": False,
    "cache_batch_size": 8,
    "plots": True,
    # QLoRA (bitsandbytes), TRL ModelConfig's names; the CLI builds a BitsAndBytesConfig from them.
    "load_in_4bit": False,
    "load_in_8bit": False,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_compute_dtype": None,  # None: the model's dtype, else bfloat16
    "use_bnb_nested_quant": False,
    "bnb_4bit_quant_storage": None,
}
LORA_KEYS = set(RUN_KEYS["lora"])
# TRL ModelConfig's flat LoRA names → keys of the `lora:` section. `use_peft: false` is `lora: null`.
TRL_LORA_KEYS = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
                 "lora_target_modules": "target_modules", "lora_target_parameters": "target_parameters",
                 "lora_modules_to_save": "modules_to_save", "lora_task_type": "task_type",
                 "use_rslora": "use_rslora", "use_dora": "use_dora"}
QUANTIZATION_KEYS = ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_compute_dtype",
                     "use_bnb_nested_quant", "bnb_4bit_quant_storage")


def config_fields() -> dict[str, dataclasses.Field]:
    from sstoken.training.config import SSTokenConfig

    return {f.name: f for f in dataclasses.fields(SSTokenConfig) if f.init}


MAX_RECIPE_BYTES = 1024 * 1024  # a recipe is a few dozen lines; anything near this size is the wrong file
DTYPES = ("auto", "float32", "float16", "bfloat16")
# Recipe values that name files or folders: text, with `~` expanded (transformers expands it in output_dir only).
PATH_KEYS = ("model", "output_dir", "logging_dir", "history_cache", "reference_cache")
# Data specs: a path, a Hub dataset id, a mapping or a mixture (sstoken.data.sources); the name used in messages.
DATA_KEYS = {"data": "training data", "eval_data": "evaluation data"}
# Deprecated aliases in transformers 5, read under their current names.
_RENAMED = {"gradient_checkpointing": "activation_checkpointing",
            "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"}
_INT64_MAX = 2**63 - 1
_SEED_MAX = 2**32 - 1  # numpy's limit; transformers seeds numpy with it


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key written twice in one mapping is an error instead of "the last wins", and
    keys must be text."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):  # `? [a, b]`
                kind = "a list" if isinstance(key_node, yaml.SequenceNode) else "a mapping"
                raise ConfigError(f"keys must be text, got {kind} (line {line})")
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):  # `1: x`, `true: x`: no setting is named like that
                raise ConfigError(f"keys must be text, got {shown(key)} (line {line})")
            if key in seen:
                raise ConfigError(f"key {shown(key)} appears twice (line {line}); keep one of them")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str):
    loader = _RecipeLoader(text)  # what yaml.safe_load does, with the duplicate-key check
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_recipe(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        path = DEMO_RECIPE
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    if path.is_dir():
        raise ConfigError(f"config {path} is a directory, not a YAML file; pass the recipe file itself")
    if not path.is_file():  # a FIFO or a device such as /dev/zero would be read forever
        raise ConfigError(f"config {path} is not a regular file")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise ConfigError(f"config {path} is {path.stat().st_size} bytes; a recipe is a YAML file of at most "
                          f"{MAX_RECIPE_BYTES} bytes")
    try:
        text = path.read_text(encoding="utf-8")
        data = _parse_yaml(text)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the file: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:  # an integer longer than Python converts; nesting too deep
        reason = "a number has too many digits" if "digits" in str(exc) else "nested too deeply"
        raise ConfigError(f"{path}: not a usable recipe: {reason}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the recipe must be a mapping of keys to values")
    recipe = dict(data)
    base = path.parent
    for key in DATA_KEYS:  # relative data paths are relative to the recipe
        if recipe.get(key) is not None:
            from sstoken.data.spec import resolve_relative_paths

            recipe[key] = resolve_relative_paths(recipe[key], base)
    if path == DEMO_RECIPE and isinstance(recipe.get("data"), str):
        recipe["data"] = str(base / recipe["data"])
    return recipe


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """``--key value`` / ``--key=value`` / ``--key v1 v2 ...`` flags, as TRL's parser reads them.

    Values are parsed as YAML scalars (numbers, booleans, null); a flag without a value is ``true``. Several
    values make a list (``--report_to wandb tensorboard``, ``--lora_target_modules q_proj v_proj``); a setting
    that takes a single value refuses several, naming the flag. A flag given twice: the last wins, as with
    argparse (``sstoken compare`` relies on it)."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}; overrides are written --key value")
        key, equals, raw = token[2:].partition("=")
        key = key.replace("-", "_")  # --max-steps is --max_steps; the value keeps its dashes
        i += 1
        if equals:
            raws = [raw]
        else:
            raws = []
            while i < len(tokens) and not tokens[i].startswith("--"):
                raws.append(tokens[i])
                i += 1
            raws = raws or ["true"]
        try:
            values = [_scalar(raw) for raw in raws]
        except ConfigError as exc:
            raise ConfigError(f"--{key}: {exc}") from None
        if len(values) > 1 and not _takes_a_list(key):
            raise ConfigError(f"--{key} takes one value, got {len(values)}: {shown(' '.join(raws))}")
        overrides[key] = values if len(values) > 1 else values[0]
    return overrides


_LIST_RUN_KEYS = {"lora_target_modules", "lora_target_parameters", "lora_modules_to_save", "data", "eval_data"}


def _takes_a_list(key: str) -> bool:
    """Whether setting ``key`` can hold a list (unknown keys: yes, so that the unknown-key message comes first)."""
    import types
    import typing

    from sstoken.training.config import SSTokenConfig

    if key in _LIST_RUN_KEYS:
        return True
    if key in RUN_KEYS or key in TRL_LORA_KEYS or key == "use_peft":
        return False
    hints = typing.get_type_hints(SSTokenConfig)
    if key not in hints:
        return True
    hint = hints[key]
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return any(typing.get_origin(arg) is list or arg is list or arg is Any for arg in args)


_SEQUENCE_LENGTH_KEYS = ("max_seq_length", "max_length")  # sstoken's run key, TRL's SFTConfig field


def merge_overrides(recipe: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The recipe with command-line flags on top. A flag in TRL's flat LoRA names (``--lora_r 8``) overrides that
    key of the recipe's ``lora:`` section, so flags and file may use different spellings."""
    merged = dict(recipe)
    for key, value in overrides.items():
        if key in _SEQUENCE_LENGTH_KEYS:  # one setting under two names: the flag replaces either
            for name in _SEQUENCE_LENGTH_KEYS:
                merged.pop(name, None)
        inner = TRL_LORA_KEYS.get(key)
        if inner is not None and key not in merged and isinstance(merged.get("lora"), dict):
            merged["lora"] = {**merged["lora"], inner: value}
        else:
            merged[key] = value
    return merged


# YAML 1.1 reads yes/no/on/off as booleans; transformers' strategies are spelled "no", "steps", ...
_YAML11_BOOLEAN_WORDS = {"yes", "no", "on", "off", "y", "n"}


def _scalar(raw: str) -> Any:
    if raw == "" or raw.strip().lower() in _YAML11_BOOLEAN_WORDS:
        return raw
    try:
        return _parse_yaml(raw)
    except yaml.YAMLError:
        return raw
    except ValueError:  # an integer longer than Python converts
        raise ConfigError(f"{shown(raw)} has too many digits to be a number") from None


def data_flag(raw: str) -> Any:
    """A data flag's value (``--eval_data``, ``--held-out``): a path or Hub id as written, or a YAML mapping/list
    in the shape of the recipe's ``data:`` (``'{path: org/ds, split: test}'``)."""
    if raw.lstrip().startswith(("{", "[")):
        try:
            return _parse_yaml(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{shown(raw)} is not a valid YAML mapping or list: {str(exc).splitlines()[0]}") from None
    return raw


def split_recipe(recipe: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run settings with defaults filled in, SSTokenConfig kwargs); unknown keys and bad run values are errors."""
    fields = config_fields()
    run = {key: value for key, value in RUN_KEYS.items()}
    run["lora"] = dict(RUN_KEYS["lora"])
    config: dict[str, Any] = {}
    recipe = _with_lora_section(recipe)
    if all(key in recipe for key in _SEQUENCE_LENGTH_KEYS):
        raise ConfigError("max_seq_length and max_length are the same setting; keep one of them")
    for old, new in _RENAMED.items():  # TRL recipes use the old names; transformers 5 warns on every run for them
        if old in recipe:
            if new in recipe:
                raise ConfigError(f"{old} and {new} are the same setting; keep {new}")
            recipe = {(new if key == old else key): value for key, value in recipe.items()}
    for key, value in recipe.items():
        if key in PATH_KEYS:
            value = _path(key, value)
        elif key in DATA_KEYS and value is not None:
            from sstoken.data.spec import check_data_spec

            check_data_spec(value, key, DATA_KEYS[key])  # the whole spec, before any model or data is loaded
        if key in RUN_KEYS:
            if key == "lora":
                value = _lora(value)
            run[key] = value
        elif key == "max_length":  # TRL's name of max_seq_length (before the SSTokenConfig fields, which hold it)
            run["max_seq_length"] = value
        elif key in fields:
            if isinstance(value, bool) and key.endswith("_strategy"):
                value = "no" if value is False else value  # `save_strategy: no` read by YAML as false
            config[key] = value
        else:
            known = list(RUN_KEYS) + list(TRL_LORA_KEYS) + ["use_peft"] + list(fields)
            raise ConfigError(f"unknown config key {shown(key)}{did_you_mean(key, known)}")
    _check_run_values(run)
    run["quantization"] = _quantization(run)
    config["max_length"] = run["max_seq_length"]
    config["trust_remote_code"] = run["trust_remote_code"]  # one setting: TRL's field and the run key
    from sstoken.models import check_model_init_kwargs

    check_model_init_kwargs(config.get("model_init_kwargs"))
    return run, config


def _with_lora_section(recipe: dict[str, Any]) -> dict[str, Any]:
    """``recipe`` with TRL's flat LoRA keys (``lora_r: 8``, ``use_peft: false``) moved into the ``lora:`` section."""
    flat = {TRL_LORA_KEYS[key]: value for key, value in recipe.items() if key in TRL_LORA_KEYS}
    if not flat and "use_peft" not in recipe:
        return recipe
    out = {key: value for key, value in recipe.items() if key not in TRL_LORA_KEYS and key != "use_peft"}
    use_peft = recipe.get("use_peft", True)
    if not isinstance(use_peft, bool):
        raise ConfigError(f"use_peft must be true or false, got {shown(use_peft)}")
    section = recipe.get("lora", {})
    if "use_peft" in recipe and use_peft and section in (None, False):
        raise ConfigError("use_peft is true but lora is null (full fine-tuning); remove one of them")
    if not use_peft and isinstance(section, dict) and section:
        raise ConfigError("use_peft is false but a lora section is given; remove one of them")
    if not use_peft or section in (None, False):
        if flat:
            first = next(key for key in recipe if key in TRL_LORA_KEYS)
            why = "use_peft is false" if not use_peft else "lora is null (full fine-tuning)"
            raise ConfigError(f"{first} is set but {why}; remove one of them")
        out["lora"] = None
        return out
    if section is True:
        section = {}
    if isinstance(section, dict):
        for key, inner in TRL_LORA_KEYS.items():
            if key in recipe and inner in section:
                raise ConfigError(f"lora {inner} and {key} are the same setting; keep one of them")
        section = {**section, **flat}
    out["lora"] = section
    return out


def _quantization(run: dict[str, Any]) -> dict[str, Any] | None:
    """The QLoRA settings (TRL ModelConfig's keys) as one checked mapping, or None when the model is not quantized.

    Only the combinations that can work are accepted: a quantized model's own weights cannot be trained, so
    quantization needs LoRA, and the 4-bit options need load_in_4bit."""
    from sstoken.models import BNB_4BIT_QUANT_TYPES, QUANTIZATION_DEFAULTS

    settings = {key: run.pop(key) for key in QUANTIZATION_KEYS}
    for key in ("load_in_4bit", "load_in_8bit", "use_bnb_nested_quant"):
        if not isinstance(settings[key], bool):
            raise ConfigError(f"{key} must be true or false, got {shown(settings[key])}")
    if settings["load_in_4bit"] and settings["load_in_8bit"]:
        raise ConfigError("load_in_4bit and load_in_8bit are both set; choose one")
    four_bit_options = [key for key in QUANTIZATION_KEYS if key.startswith(("bnb_", "use_bnb"))
                        and settings[key] != QUANTIZATION_DEFAULTS[key]]
    if four_bit_options and not settings["load_in_4bit"]:
        raise ConfigError(f"{four_bit_options[0]} only applies with load_in_4bit: true")
    if not (settings["load_in_4bit"] or settings["load_in_8bit"]):
        return None
    bits = "load_in_4bit" if settings["load_in_4bit"] else "load_in_8bit"
    if not run["lora"]:
        raise ConfigError(f"{bits} needs LoRA (QLoRA): a quantized model's own weights cannot be trained; set a "
                          f"lora: section or remove {bits}")
    if settings["bnb_4bit_quant_type"] not in BNB_4BIT_QUANT_TYPES:
        raise ConfigError(f"bnb_4bit_quant_type must be one of {', '.join(BNB_4BIT_QUANT_TYPES)}, got "
                          f"{shown(settings['bnb_4bit_quant_type'])}")
    for key, allowed in (("bnb_4bit_compute_dtype", DTYPES[1:]), ("bnb_4bit_quant_storage", DTYPES[1:] + ("uint8",))):
        if settings[key] is not None and settings[key] not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {shown(settings[key])}"
                              f"{did_you_mean(settings[key], allowed)}")
    return settings


def _path(key: str, value: Any) -> Any:
    """A path value: text (None where the key is optional), with `~` expanded."""
    if value is None and key != "output_dir":
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} must be a path (text), got {shown(value)}")
    return str(Path(value).expanduser()) if value.startswith("~") else value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _lora(value: Any) -> dict | None:
    """The `lora:` section with defaults filled in, or None (full fine-tuning)."""
    if value in (None, False):
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError("lora must be a mapping (r, alpha, dropout, target_modules, ...), or null for full "
                          "fine-tuning")
    unknown = set(value) - LORA_KEYS
    if unknown:
        bad = sorted(unknown)[0]
        raise ConfigError(f"unknown lora key {shown(bad)}{did_you_mean(bad, LORA_KEYS)}")
    lora = {**RUN_KEYS["lora"], **value}
    for key, kind, low, high in (("r", int, 1, 65536), ("alpha", int, 1, 2**20), ("dropout", float, 0, 1)):
        lora[key] = _converted(f"lora {key}", lora[key], kind)  # numeric strings as for the other settings
        if not low <= lora[key] <= high or (key == "dropout" and lora[key] == 1):
            raise ConfigError(f"lora {key} must be in {'[0, 1)' if key == 'dropout' else f'[{low}, {high}]'}, "
                              f"got {shown(lora[key])}")
    targets = lora["target_modules"]
    if not _is_names(targets):
        raise ConfigError(f"lora target_modules must be a module name, a list of names or 'all-linear', got "
                          f"{shown(targets)}")
    if isinstance(targets, str) and targets != "all-linear" and re.fullmatch(r"[\w.]+", targets):
        # PEFT reads a string as a regex over full module paths, so a plain name ("q_proj") would match nothing;
        # as a list it matches by name, as `--lora_target_modules q_proj` does in TRL. Regexes stay strings.
        lora["target_modules"] = [targets]
    for key in ("target_parameters", "modules_to_save"):
        if lora[key] is not None and not _is_names(lora[key]):
            raise ConfigError(f"lora {key} must be a name or a list of names, got {shown(lora[key])}")
        if isinstance(lora[key], str):
            lora[key] = [lora[key]]
    for key in ("use_rslora", "use_dora"):
        if not isinstance(lora[key], bool):
            raise ConfigError(f"lora {key} must be true or false, got {shown(lora[key])}")
    if lora["task_type"] != "CAUSAL_LM":
        raise ConfigError(f"lora task_type must be CAUSAL_LM (sstoken trains causal language models), got "
                          f"{shown(lora['task_type'])}")
    return lora


def _is_names(value: Any) -> bool:
    """A non-empty name, or a non-empty list of non-empty names."""
    return (isinstance(value, str) and bool(value.strip())) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value))


def _check_run_values(run: dict[str, Any]) -> None:
    """The run's own keys (model, data, dtype, ...); SSTokenConfig's fields are checked by check_value_types."""
    run["max_seq_length"] = length = _converted("max_seq_length", run["max_seq_length"], int)
    if not 2 <= length <= 2**24:
        raise ConfigError(f"max_seq_length must be from 2 to {2**24}, got {shown(length)}")
    if run["dtype"] not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {shown(run['dtype'])}"
                          f"{did_you_mean(run['dtype'], DTYPES)}")
    if not isinstance(run["attn_implementation"], str) or not run["attn_implementation"].strip():
        raise ConfigError(f"attn_implementation must be a name such as sdpa or eager, got "
                          f"{shown(run['attn_implementation'])}")
    for key in ("trust_remote_code", "plots"):
        if not isinstance(run[key], bool):
            raise ConfigError(f"{key} must be true or false, got {shown(run[key])}")
    run["cache_batch_size"] = _converted("cache_batch_size", run["cache_batch_size"], int)
    if not 1 <= run["cache_batch_size"] <= 2**20:
        raise ConfigError(f"cache_batch_size must be from 1 to {2**20}, got {shown(run['cache_batch_size'])}")


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "text"}

# Ranges that transformers checks late or never: a batch size of 0 fails inside the DataLoader, a negative
# epoch count or learning rate trains nothing or diverges and still exits 0. (lower bound, bound included?)
_LOWER_BOUNDS: dict[str, tuple[float, bool]] = {
    "per_device_train_batch_size": (1, True),
    "per_device_eval_batch_size": (1, True),
    "gradient_accumulation_steps": (1, True),
    "num_train_epochs": (0, False),
    "learning_rate": (0, True),
    "weight_decay": (0, True),
    "max_grad_norm": (0, True),
    "warmup_steps": (0, True),
    "adam_epsilon": (0, True),
    "save_steps": (0, False),
    "logging_steps": (0, False),
    "eval_steps": (0, False),
    "save_total_limit": (0, True),
    "dataloader_num_workers": (0, True),
    "seed": (0, True),
    "data_seed": (0, True),
    "selection_seed": (0, True),
}
_SEEDS = ("seed", "data_seed", "selection_seed")


def _scalar_type(hint) -> tuple[type | None, bool]:
    """(int, float, bool or str when that is the field's only non-None type, else None; whether None is allowed)."""
    import types
    import typing

    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    allows_none = type(None) in args
    rest = [a for a in args if a is not type(None)]
    return (rest[0] if len(rest) == 1 and rest[0] in _TYPE_WORDS else None), allows_none


def _takes_numbers(hint) -> bool:
    """Whether a field annotated ``hint`` can hold a number or a boolean (unknown annotations: assume so)."""
    import enum
    import types
    import typing

    if hint is None or hint is Any:
        return True
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for arg in args:
        origin = typing.get_origin(arg) or arg
        if arg is Any or (isinstance(origin, type) and (issubclass(origin, (int, float, bool))
                                                        or (issubclass(origin, enum.Enum) and
                                                            not issubclass(origin, str)))):
            return True
    return False


def _converted(key: str, value: Any, expected: type) -> Any:
    """``value`` as ``expected`` (numeric strings become numbers), or ConfigError."""
    if expected is str:
        ok = isinstance(value, str)
    elif isinstance(value, bool) or value is None:
        ok = expected is bool and value is not None
    elif expected is bool:
        ok = False
    elif isinstance(value, str):
        try:
            value = expected(value.strip())
            ok = True
        except ValueError:
            ok = False
    else:
        ok = isinstance(value, int) if expected is int else isinstance(value, (int, float))
    if not ok:
        raise ConfigError(f"{key} must be {_TYPE_WORDS[expected]}, got {shown(value)}")
    if expected in (int, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {shown(value)}")
    if expected is int and abs(value) > (_SEED_MAX if key in _SEEDS else _INT64_MAX):
        raise ConfigError(f"{key} is too large: {shown(value)}")
    return value


def check_value_types(config_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Check recipe values against SSTokenConfig's annotations and ranges; returns converted kwargs.

    YAML hands over whatever was written: ``max_steps: abc`` or ``learning_rate: [1]`` would otherwise reach
    transformers' training loop and fail there with a traceback, ``rho: true`` would silently mean 1, and
    ``learning_rate: .inf`` would train an adapter full of NaN. PyYAML reads ``1e-4`` (no dot) as a string, so
    numeric strings are converted for number fields.
    """
    import typing

    from sstoken.training.config import SSTokenConfig

    hints = typing.get_type_hints(SSTokenConfig)
    out = dict(config_kwargs)
    for key, value in config_kwargs.items():
        if key == "resume_from_checkpoint" and isinstance(value, bool):
            continue  # true: the newest complete checkpoint (the CLI resolves it)
        expected, allows_none = _scalar_type(hints.get(key))
        if expected is None and isinstance(value, (bool, int, float)) and not _takes_numbers(hints.get(key)):
            # e.g. `accelerator_config: 1` (a path or a mapping): transformers would open file descriptor 1
            raise ConfigError(f"{key} must be text or a mapping, got {shown(value)}")
        if expected is None or (value is None and allows_none):
            continue
        out[key] = _converted(key, value, expected)
    for key, (bound, inclusive) in _LOWER_BOUNDS.items():
        value = out.get(key)
        if _is_number(value) and (value < bound if inclusive else value <= bound):
            raise ConfigError(f"{key} must be {'>=' if inclusive else '>'} {bound}, got {shown(value)}")
    if isinstance(out.get("lr_scheduler_kwargs"), dict):
        out["lr_scheduler_kwargs"] = {k: _exponent_number(v) for k, v in out["lr_scheduler_kwargs"].items()}
    if "report_to" in out:
        _check_report_to(out["report_to"])
    max_steps = out.get("max_steps")
    if _is_int(max_steps) and max_steps != -1 and max_steps < 1:
        raise ConfigError(f"max_steps must be >= 1, or -1 to train for num_train_epochs, got {max_steps}")
    return out


_EXPONENT_NUMBER = re.compile(r"[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+")


def _exponent_number(value: Any) -> Any:
    """``"1e-6"`` as 1e-06. YAML 1.1 reads a number in exponent form without a dot as text, which top-level fields
    undo by their type; the scheduler's keyword arguments are all numbers (min_lr, num_cycles, power, ...), while
    other mappings may hold text of that shape (a revision ``1234e56``), so only they are converted."""
    if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


def _check_report_to(value: Any) -> None:
    """Logger names, checked here rather than when the trainer is built, after the model has loaded."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    if value is None:
        return
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ConfigError(f"report_to must be a logger name or a list of names, got {shown(value)}")
    known = ["none", "all", *INTEGRATION_TO_CALLBACK]
    for name in names:
        if name not in known:
            raise ConfigError(f"report_to {shown(name)} is not one of {', '.join(known)}{did_you_mean(name, known)}")


def build_config(config_kwargs: dict[str, Any]):
    """SSTokenConfig from recipe values, turning type errors into ConfigError."""
    from sstoken.training.config import SSTokenConfig

    kwargs = check_value_types(config_kwargs)
    kwargs.setdefault("output_dir", "runs/sstoken")
    try:
        return SSTokenConfig(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError, OSError, ImportError) as exc:  # e.g. a missing config file or package
        raise ConfigError(f"invalid training setting: {exc}") from exc
