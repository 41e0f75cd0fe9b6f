"""What several commands share: the recipe turned into run settings and an SSTokenConfig, the output-folder
check, the run's data loader and the LoRA config."""

from __future__ import annotations

from pathlib import Path

from sstoken.data.sources import load_rows
from sstoken.errors import ConfigError


# ----------------------------------------------------------------------------------------------- helpers
def prepare_run(args_config: str | None, overrides: list[str]):
    from sstoken.cli.recipe import (
        build_config,
        load_recipe,
        merge_overrides,
        parse_overrides,
        split_recipe,
    )

    recipe = merge_overrides(load_recipe(args_config), parse_overrides(overrides))
    run, config_kwargs = split_recipe(recipe)
    if not run["data"]:
        raise ConfigError("no training data: set `data:` in the recipe or pass --data path.jsonl")
    config = build_config(config_kwargs)
    if config.eval_strategy != "no" and not run["eval_data"]:
        raise ConfigError(f"eval_strategy {config.eval_strategy.value} needs eval_data (a data source like data), "
                          f"or set eval_strategy: no")
    return run, config


# What a folder holds once sstoken has trained into it (train) or written a cache (cache).
RUN_MARKERS = ("summary.json", "log_history.json", "adapter_config.json", "adapter_model.safetensors",
                "model.safetensors", "model.safetensors.index.json", "trainer_state.json")


CACHE_MARKERS = ("index.json",)


def check_output_folder(path, what: str, markers: tuple[str, ...]) -> None:
    """Refuse to write into a file, or into a non-empty folder that is not sstoken's own: the run would overwrite
    the user's files there (the model card is README.md). An earlier result is fine: it is resumed or replaced."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{what} {folder} is a file; choose a folder for the results")
    if not folder.is_dir():
        return
    try:
        names = sorted(p.name for p in folder.iterdir())
    except OSError as exc:
        raise ConfigError(f"{what} {folder} cannot be read: {exc.strerror or exc}") from None
    if not names or any(n in markers or (is_checkpoint_name(n) and (folder / n).is_dir()) for n in names):
        return
    raise ConfigError(f"{what} {folder} is not empty and is not an earlier sstoken result (it holds "
                      f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); its files could be overwritten, "
                      f"so choose a new or empty folder")


def is_checkpoint_name(name: str) -> bool:
    return name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit()


def load_run_tokenizer(model_name: str, run: dict, config):
    """The tokenizer a run encodes its data with: ``model_name``'s, with the recipe's eos_token and chat template
    applied (before any row is encoded, so that train, cache and compare encode the same rows)."""
    from sstoken.models import load_tokenizer, revision_of
    from sstoken.training.config import apply_tokenizer_settings

    tokenizer = load_tokenizer(model_name, run["trust_remote_code"], revision=revision_of(config.model_init_kwargs))
    apply_tokenizer_settings(tokenizer, config)
    return tokenizer


def load_run_rows(spec, tokenizer, max_seq_length: int, config, what: str = "data"):
    """The encoded rows of a data spec (a ``datasets.Dataset``) and their LoadStats; a mixture is shuffled with
    the run's data_seed (else seed), so that train and cache see the same rows. Under torchrun the main process
    of each node encodes first and the others then read its cache file (``TrainingArguments.main_process_first``,
    a no-op in a single process)."""
    seed = config.data_seed if config.data_seed is not None else config.seed
    with config.main_process_first(desc=f"sstoken: encoding {what}"):
        return load_rows(spec, tokenizer, max_seq_length, what=what, seed=seed, num_proc=config.dataset_num_proc)


def lora_config(lora: dict | None):
    if not lora:
        return None
    from peft import LoraConfig

    # TRL's get_peft_config passes target_parameters only when set (older PEFT versions lack it).
    optional = {"target_parameters": lora["target_parameters"]} if lora.get("target_parameters") else {}
    return LoraConfig(r=int(lora["r"]), lora_alpha=int(lora["alpha"]), lora_dropout=float(lora["dropout"]),
                      target_modules=lora["target_modules"], modules_to_save=lora.get("modules_to_save"),
                      use_rslora=bool(lora.get("use_rslora")), use_dora=bool(lora.get("use_dora")),
                      task_type=lora.get("task_type", "CAUSAL_LM"), **optional)
