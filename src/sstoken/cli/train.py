"""``sstoken train``: fine-tune with token selection from a YAML recipe and flags, write the run directory
(adapter or model, ``summary.json``, ``log_history.json``, plots), resume from its checkpoints."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from sstoken.cli.common import (
    RUN_MARKERS,
    check_output_folder,
    is_checkpoint_name,
    load_run_rows,
    load_run_tokenizer,
    lora_config,
    prepare_run,
)
from sstoken.errors import ConfigError, SSTokenError, escaped
from sstoken.io import atomic_write_json

logger = logging.getLogger("sstoken")

def register_cli(subparsers) -> None:
    train = subparsers.add_parser("train", help="fine-tune with token selection (no --config: the demo)",
                           description="Fine-tune with token selection. Any recipe key can be given as --key value.")
    train.add_argument("--config", help="YAML recipe (default: the demo recipe)")
    train.add_argument("--help-config", action="store_true", help="list every configuration key and exit")
    train.set_defaults(handler=_train_or_list_keys, takes_overrides=True)


def _train_or_list_keys(ns, overrides: list[str]) -> int:
    return help_config() if ns.help_config else cmd_train(ns, overrides)


def cmd_train(ns, overrides: list[str], data=None) -> int:
    """Train the recipe ``ns.config`` with ``overrides``. ``data``: the training rows already encoded, as
    (rows, LoadStats) from :func:`~sstoken.cli.common.load_run_rows` with this run's tokenizer (``sstoken
    compare`` trains every run on the rows it read once); else the recipe's ``data`` is read."""
    from sstoken.models import load_model
    from sstoken.training.config import check_history_source, check_one_device_per_process
    from sstoken.training.trainer import SSTokenTrainer, check_text_rows

    run, config = prepare_run(ns.config, overrides)
    for key in ("history_cache", "reference_cache"):
        if getattr(config, key) and not Path(getattr(config, key)).is_dir():
            raise ConfigError(f"{key} {getattr(config, key)} does not exist; build it first with "
                              f"`sstoken cache --config {ns.config or '<recipe>'}`")
    check_output_folder(config.output_dir, "output_dir", RUN_MARKERS)
    check_history_source(config, trains_an_adapter=bool(run["lora"]))
    check_one_device_per_process(config)
    if run["quantization"]:
        from sstoken.models import check_quantization_possible

        check_quantization_possible(run["quantization"], config.device.type)
    if run["attn_implementation"].startswith("flex") and config.device.type == "cpu":
        # PyTorch's FlexAttention has no backward pass on CPU: the first step would fail inside the training loop.
        raise ConfigError(f"attn_implementation {run['attn_implementation']} cannot train on CPU; use sdpa or eager")
    if config.device.type == "cpu":
        # accelerate imports DeepSpeed, where it is installed, to recognise its engine, and DeepSpeed then logs a
        # WARNING that it found no GPU and falls back to the CPU. The run is on the CPU: it is told so.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    resume = _resolve_resume(config.resume_from_checkpoint, config.output_dir)
    _check_attention_layer(run, config)
    started = time.time()
    tokenizer = load_run_tokenizer(run["model"], run, config)
    rows, stats = data if data is not None else load_run_rows(run["data"], tokenizer, run["max_seq_length"], config)
    check_text_rows(stats, config, "data")
    eval_dataset = None
    if run["eval_data"]:
        eval_dataset, _ = load_run_rows(run["eval_data"], tokenizer, run["max_seq_length"], config, "eval_data")
    for cache_path in (config.history_cache, config.reference_cache):
        if cache_path:
            _check_cache_covers(cache_path, rows["input_ids"])
    model = load_model(run["model"], run["dtype"], run["attn_implementation"], run["trust_remote_code"],
                       extra_kwargs=config.model_init_kwargs, quantization=run["quantization"],
                       device=config.device.type)
    config.model_init_kwargs = None  # used by load_model above; the trainer gets the built model
    try:
        trainer = SSTokenTrainer(model=model, args=config, train_dataset=rows,
                                 eval_dataset=eval_dataset, processing_class=tokenizer,
                                 peft_config=lora_config(run["lora"]))
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
    from sstoken.selection.nll_cache import INDEX_FILE, sample_key

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
        numbered = [p for p in out.glob("checkpoint-*") if p.is_dir() and is_checkpoint_name(p.name)]
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
    from sstoken.selection.selectors import make_selector

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
    from sstoken.selection.attention import resolve_layer

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
        "rows_weighted": stats.weighted,
        "selection_method": config.selection_method,
        "loss_type": config.loss_type,
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
        from sstoken.report.plots import write_training_plots
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


def help_config() -> int:
    from sstoken.cli.recipe import RUN_KEYS, TRL_LORA_KEYS, config_fields

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
