"""The ``sstoken`` command: train, cache, and the tools built on them.

Every user error (bad data, bad configuration, a cache that does not match) ends with one line on stderr
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from sstoken.errors import ConfigError, SSTokenError, escaped, one_line, shown
from sstoken.io import atomic_write_json

logger = logging.getLogger("sstoken")

USAGE_EXAMPLES = """\
examples:
  sstoken train                                  # the demo: embedded SmolLM2-135M + LoRA on the demo data
  sstoken train --config recipe.yaml --rho 0.5   # flags override the YAML file
  sstoken cache --config recipe.yaml             # precompute the base model's NLL (history_cache)
  sstoken train --help-config                    # every configuration key
  sstoken eval runs/demo                         # score a run with lm-eval-harness on local tasks
  sstoken compare --config recipe.yaml --methods full sstoken --eval_data held_out.jsonl
"""


# ----------------------------------------------------------------------------------------------- helpers
def _prepare(args_config: str | None, overrides: list[str]):
    from sstoken.recipe import build_config, load_recipe, merge_overrides, parse_overrides, split_recipe

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
_RUN_MARKERS = ("summary.json", "log_history.json", "adapter_config.json", "adapter_model.safetensors",
                "model.safetensors", "model.safetensors.index.json", "trainer_state.json")
_CACHE_MARKERS = ("index.json",)


def _check_output_folder(path, what: str, markers: tuple[str, ...]) -> None:
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
    if not names or any(n in markers or (_is_checkpoint_name(n) and (folder / n).is_dir()) for n in names):
        return
    raise ConfigError(f"{what} {folder} is not empty and is not an earlier sstoken result (it holds "
                      f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); its files could be overwritten, "
                      f"so choose a new or empty folder")


def _is_checkpoint_name(name: str) -> bool:
    return name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit()


def _load_rows(spec, tokenizer, max_seq_length: int, config, what: str = "data"):
    """The encoded rows of a data spec (a ``datasets.Dataset``) and their LoadStats; a mixture is shuffled with
    the run's data_seed (else seed), so that train and cache see the same rows. Under torchrun the main process
    of each node encodes first and the others then read its cache file (``TrainingArguments.main_process_first``,
    a no-op in a single process)."""
    seed = config.data_seed if config.data_seed is not None else config.seed
    with config.main_process_first(desc=f"sstoken: encoding {what}"):
        return load_rows(spec, tokenizer, max_seq_length, what=what, seed=seed, num_proc=config.dataset_num_proc)


DEFAULT_DATA_SEED = 42
"""The seed of a mixture's shuffle when no recipe gives one: TrainingArguments' default ``seed``."""


def load_rows(spec, tokenizer, max_seq_length: int, *, what: str = "data", seed: int = DEFAULT_DATA_SEED,
              num_proc: int | None = None):
    """The one loader of every command (train, cache, compare, inspect, eval --held-out): the encoded rows of a
    data spec and their LoadStats, logged."""
    from sstoken.sources import load_data

    rows, stats = load_data(spec, tokenizer, max_seq_length, what=what, seed=seed, num_proc=num_proc)
    logger.info("%s %s: %d rows read, %d used, %d skipped (no trainable token after truncation), %d truncated; "
                "formats: %s", what, escaped(spec) if isinstance(spec, str) else shown(spec), stats.rows_read,
                stats.used, stats.skipped_no_trainable_token, stats.truncated,
                ", ".join(f"{fmt} {count}" for fmt, count in sorted(stats.formats.items())))
    return rows, stats


def _peft_config(lora: dict | None):
    if not lora:
        return None
    from peft import LoraConfig

    # TRL's get_peft_config passes target_parameters only when set (older PEFT versions lack it).
    optional = {"target_parameters": lora["target_parameters"]} if lora.get("target_parameters") else {}
    return LoraConfig(r=int(lora["r"]), lora_alpha=int(lora["alpha"]), lora_dropout=float(lora["dropout"]),
                      target_modules=lora["target_modules"], modules_to_save=lora.get("modules_to_save"),
                      use_rslora=bool(lora.get("use_rslora")), use_dora=bool(lora.get("use_dora")),
                      task_type=lora.get("task_type", "CAUSAL_LM"), **optional)


# ----------------------------------------------------------------------------------------------- train
def cmd_train(ns, overrides: list[str]) -> int:
    from sstoken.models import load_model, load_tokenizer, revision_of
    from sstoken.trainer import SSTokenTrainer, apply_tokenizer_settings, check_history_source, check_text_rows

    run, config = _prepare(ns.config, overrides)
    for key in ("history_cache", "reference_cache"):
        if getattr(config, key) and not Path(getattr(config, key)).is_dir():
            raise ConfigError(f"{key} {getattr(config, key)} does not exist; build it first with "
                              f"`sstoken cache --config {ns.config or '<recipe>'}`")
    _check_output_folder(config.output_dir, "output_dir", _RUN_MARKERS)
    check_history_source(config, trains_an_adapter=bool(run["lora"]))
    if run["quantization"]:
        from sstoken.models import check_quantization_possible

        check_quantization_possible(run["quantization"])
    if run["attn_implementation"].startswith("flex") and config.device.type == "cpu":
        # PyTorch's FlexAttention has no backward pass on CPU: the first step would fail inside the training loop.
        raise ConfigError(f"attn_implementation {run['attn_implementation']} cannot train on CPU; use sdpa or eager")
    resume = _resolve_resume(config.resume_from_checkpoint, config.output_dir)
    _check_attention_layer(run, config)
    started = time.time()
    tokenizer = load_tokenizer(run["model"], run["trust_remote_code"],
                               revision=revision_of(config.model_init_kwargs))
    apply_tokenizer_settings(tokenizer, config)  # eos_token, chat_template_path: before the data is encoded
    rows, stats = _load_rows(run["data"], tokenizer, run["max_seq_length"], config)
    check_text_rows(stats, config, "data")
    eval_dataset = None
    if run["eval_data"]:
        eval_dataset, _ = _load_rows(run["eval_data"], tokenizer, run["max_seq_length"], config, "eval_data")
    for cache_path in (config.history_cache, config.reference_cache):
        if cache_path:
            _check_cache_covers(cache_path, rows["input_ids"])
    model = load_model(run["model"], run["dtype"], run["attn_implementation"], run["trust_remote_code"],
                       extra_kwargs=config.model_init_kwargs, quantization=run["quantization"])
    config.model_init_kwargs = None  # used by load_model above; the trainer gets the built model
    try:
        trainer = SSTokenTrainer(model=model, args=config, train_dataset=rows,
                                 eval_dataset=eval_dataset, processing_class=tokenizer,
                                 peft_config=_peft_config(run["lora"]))
    except ValueError as exc:
        # PEFT refuses LoRA target modules that the model lacks or cannot adapt (e.g. Mamba's out_proj) with a
        # ValueError while the trainer wraps the model: a fix in the recipe's `lora:` section, not a bug.
        if run["lora"] and _raised_inside(exc, "peft"):
            raise ConfigError(f"lora: {exc}") from None
        # transformers and TRL check some settings only here (report_to names, an eval_strategy without
        # eval_data): the same kind of mistake as the ones the recipe catches earlier.
        if _raised_inside(exc, "transformers") or _raised_inside(exc, "trl"):
            raise ConfigError(f"invalid training setting: {exc}") from None
        raise
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except (SSTokenError, KeyboardInterrupt):
        print(file=sys.stderr)  # end the progress bar's line, so that the message below is a line of its own
        raise
    trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(config.output_dir)
    summary = _summary(trainer, run, config, stats, result, time.time() - started)
    if trainer.is_world_process_zero():
        out = Path(config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "summary.json", summary)
        atomic_write_json(out / "log_history.json", trainer.state.log_history)
        if run["plots"]:
            _write_plots(out)
        _print_summary(summary)
    return 0


def _raised_inside(exc: BaseException, package: str) -> bool:
    """Whether the innermost frame of ``exc``'s traceback is in ``package``'s source."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and f"{os.sep}{package}{os.sep}" in frames[-1].filename


def _check_cache_covers(path: str, input_ids) -> None:
    """Every training sample must be in the NLL cache; checked from the cache index before the model loads.

    (Without this, a cache of other data would only fail at the first training step that misses it.)
    A cache whose index cannot be read is left to the trainer, whose NLLCache.open explains what is wrong.
    """
    from sstoken.history import INDEX_FILE, sample_key

    try:
        index = json.loads((Path(path) / INDEX_FILE).read_text(encoding="utf-8"))
        keys = {key for shard in index["shards"] for key in shard["keys"]}
    except (OSError, ValueError, KeyError, TypeError):
        return
    total = missing = 0
    for ids in input_ids:
        total += 1
        missing += sample_key(ids) not in keys
    if missing:
        raise ConfigError(f"cache {path} was built for different data: {missing} of {total} training samples "
                          f"are not in it (the data, max_seq_length or tokenizer changed); rebuild it with "
                          f"`sstoken cache`")


_WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json",
                 "adapter_model.bin", "pytorch_model.bin")


def _checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from, or None. transformers writes trainer_state.json last (sstoken's
    state file comes before it), in place."""
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no readable trainer_state.json; the run stopped while saving it"
    if not any((folder / name).is_file() for name in _WEIGHT_FILES):
        return "no adapter or model weights"
    return None


def _resolve_resume(resume, output_dir) -> str | None:
    """The checkpoint folder to resume from, or None; checked before any model is loaded.

    ``true`` means the newest *complete* checkpoint. transformers writes a checkpoint's files straight into
    checkpoint-N (no temporary folder), so a run killed while saving leaves a folder without a readable
    trainer_state.json. transformers itself would pick that folder (the highest N) and fail with a traceback,
    so it is skipped here with a warning and the previous checkpoint is used.
    """
    if isinstance(resume, str) and resume.strip().lower() in ("true", "last", "latest"):
        resume = True
    if resume is None or resume is False or resume == "":
        return None
    if resume is True:
        out = Path(output_dir)
        numbered = [p for p in out.glob("checkpoint-*") if p.is_dir() and _is_checkpoint_name(p.name)]
        for folder in sorted(numbered, key=lambda p: int(p.name[len("checkpoint-"):]), reverse=True):
            problem = _checkpoint_problem(folder)
            if problem is None:
                return str(folder)
            logger.warning("skipping %s: incomplete (%s)", escaped(folder), problem)
        raise ConfigError(f"resume_from_checkpoint: no complete checkpoint in {out} to resume from")
    folder = Path(str(resume)).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"resume_from_checkpoint: {folder} does not exist")
    problem = _checkpoint_problem(folder)
    if problem is not None:
        raise ConfigError(f"resume_from_checkpoint: {folder} is incomplete ({problem}); resume from an earlier "
                          f"checkpoint")
    return str(folder)


def _check_attention_layer(run, config) -> None:
    """attention_layer against the model's config.json, so that a wrong index fails before the weights load.

    The trainer checks it again on the loaded model (and that the attention can be hooked at all); a model
    whose config cannot be read here is left to load_model, which reports it.
    """
    from sstoken.selection import make_selector

    selector = make_selector(config.selection_method, config.rho, config.gamma, config.attention_warmup,
                             config.selection_seed)
    if not selector.needs_attention:
        return
    from transformers import AutoConfig

    from sstoken.models import resolve_model

    path, gguf = resolve_model(run["model"])
    if gguf:
        return  # reading a GGUF file's config costs about as much as loading it: leave it to the trainer
    try:
        model_config = AutoConfig.from_pretrained(path, trust_remote_code=run["trust_remote_code"])
        n_layers = int(model_config.get_text_config().num_hidden_layers)
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return
    from sstoken.attention import resolve_layer

    resolve_layer(config.attention_layer, n_layers)


def _summary(trainer, run, config, stats, result, wall_s: float) -> dict:
    history = [h for h in trainer.state.log_history if "loss" in h]

    def mean_of(key):
        values = [h[key] for h in history if key in h]
        return sum(values) / len(values) if values else None

    last = history[-1] if history else {}
    return {
        "model": run["model"] or "smollm2-135m-instruct (embedded)",
        "data": run["data"],
        "rows_used": stats.used,
        "rows_skipped_no_trainable_token": stats.skipped_no_trainable_token,
        "selection_method": config.selection_method,
        "rho": config.rho,
        "gamma": config.gamma,
        "history": config.history,
        "history_cache": config.history_cache,
        "lora": run["lora"],
        "quantization": run["quantization"],
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "final_loss_kept": last.get("loss_kept"),
        "final_loss_all": last.get("loss_all"),
        "mean_kept_fraction": mean_of("kept_fraction"),
        "mean_attention_share": mean_of("mean_attention_share"),
        "skipped_nonfinite_steps": trainer.skipped_nonfinite_steps,
        "wall_time_s": round(wall_s, 1),
        "output_dir": str(config.output_dir),
    }


def _write_plots(out: Path) -> None:
    try:
        from sstoken.report import write_training_plots
    except ImportError:
        return
    try:
        write_training_plots(out)
    except SSTokenError as exc:
        logger.warning("plots not written: %s", exc)


def _print_summary(summary: dict) -> None:
    print("\nsstoken summary")
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        print(f"  {key:32s} {value}")


# ----------------------------------------------------------------------------------------------- cache
def cmd_cache(ns, overrides: list[str]) -> int:
    from sstoken.history import build_nll_cache
    from sstoken.models import load_model, load_tokenizer, revision_of

    run, config = _prepare(ns.config, overrides)
    model_name = ns.model or run["model"]
    out = ns.out or (config.reference_cache if ns.reference else config.history_cache)
    if not out:
        raise ConfigError("where should the cache go? set history_cache in the recipe or pass --out DIR")
    out = str(Path(out).expanduser())
    _check_output_folder(out, "cache folder", _CACHE_MARKERS)
    if ns.adapter and not (Path(ns.adapter).expanduser() / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter {ns.adapter} is not a PEFT adapter folder (no adapter_config.json there)")
    from sstoken.trainer import apply_tokenizer_settings

    tokenizer = load_tokenizer(model_name, run["trust_remote_code"], revision=revision_of(config.model_init_kwargs))
    apply_tokenizer_settings(tokenizer, config)  # the cache must hold the rows that training will encode
    rows, _ = _load_rows(run["data"], tokenizer, run["max_seq_length"], config)
    rows = rows.to_list()  # the very rows train uses: same spec, tokenizer, max_seq_length and mixture seed
    model = load_model(model_name, run["dtype"], run["attn_implementation"], run["trust_remote_code"],
                       extra_kwargs=config.model_init_kwargs, quantization=run["quantization"])
    if ns.adapter:
        from sstoken.models import load_adapter

        model = load_adapter(model, ns.adapter)
    started = time.time()
    cache = build_nll_cache(model, tokenizer, rows, out, run["max_seq_length"], batch_size=run["cache_batch_size"])
    print(f"sstoken cache: {len(cache)} samples written to {out} in {time.time() - started:.1f}s")
    return 0


# ----------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sstoken",
        description="Token selection (ssToken and peers) for LLM supervised fine-tuning on the Hugging Face stack.",
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from sstoken import __version__

    parser.add_argument("--version", action="version", version=f"sstoken {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="fine-tune with token selection (no --config: the demo)",
                           description="Fine-tune with token selection. Any recipe key can be given as --key value.")
    train.add_argument("--config", help="YAML recipe (default: the demo recipe)")
    train.add_argument("--help-config", action="store_true", help="list every configuration key and exit")

    cache = sub.add_parser("cache", help="precompute per-token NLL of the base (or a reference) model",
                           description="Run a model once over the training data and store its per-token NLL.")
    cache.add_argument("--config", help="YAML recipe (default: the demo recipe)")
    cache.add_argument("--model", help="model to score with (default: the recipe's model)")
    cache.add_argument("--adapter", help="a PEFT adapter to apply to the model (e.g. a reference model)")
    cache.add_argument("--out", help="cache directory (default: the recipe's history_cache)")
    cache.add_argument("--reference", action="store_true", help="write to the recipe's reference_cache")

    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands():
    """Commands that live in their own modules (report, inspect, eval, compare), registered if present."""
    registrars = []
    for module_name in ("sstoken.report", "sstoken.eval_cli", "sstoken.compare_cli"):
        try:
            module = __import__(module_name, fromlist=["register_cli"])
        except ImportError:
            continue
        if hasattr(module, "register_cli"):
            registrars.append(module.register_cli)
    return registrars


def _help_config() -> int:
    from sstoken.recipe import RUN_KEYS, TRL_LORA_KEYS, config_fields

    print("run keys:")
    for key, default in RUN_KEYS.items():
        print(f"  {key:28s} default {default!r}")
    print("\nselection keys (SSTokenConfig):")
    from trl import SFTConfig

    inherited = set(SFTConfig.__dataclass_fields__)
    for name, fld in config_fields().items():
        if name in inherited:
            continue
        print(f"  {name:28s} default {fld.default!r}: {fld.metadata.get('help', '')}")
    print(f"\nplus every TRL SFTConfig / TrainingArguments field ({len(inherited)} keys), e.g. learning_rate, "
          f"max_steps, per_device_train_batch_size, gradient_accumulation_steps, save_steps, report_to "
          f"(docs/config.md says which are refused);")
    print(f"LoRA also as TRL's flat names: {', '.join(TRL_LORA_KEYS)}, use_peft.")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "datasets", "accelerate", "peft", "trl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser = build_parser()
    ns, rest = parser.parse_known_args(argv)
    if ns.command is None:
        parser.print_help()
        return 0
    if ns.command == "train" and ns.help_config:
        return _help_config()
    handler = {"train": cmd_train, "cache": cmd_cache}.get(ns.command) or getattr(ns, "handler", None)
    if handler is None:
        parser.error(f"unknown command {ns.command}")
    if rest and ns.command not in ("train", "cache") and not getattr(ns, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(handler(ns, rest) or 0)
    except SSTokenError as exc:
        # One line whatever the message holds: YAML and PEFT errors span several, file names can hold control
        # characters, and a quoted value can be huge.
        print(f"sstoken: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sstoken: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
