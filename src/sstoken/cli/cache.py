"""``sstoken cache``: run a model once over the training data and store its per-token NLL (``history_cache``,
or a reference model's ``reference_cache``)."""

from __future__ import annotations

import time
from pathlib import Path

from sstoken.cli.common import (
    CACHE_MARKERS,
    check_output_folder,
    load_run_rows,
    load_run_tokenizer,
    prepare_run,
)
from sstoken.errors import ConfigError


def register_cli(subparsers) -> None:
    cache = subparsers.add_parser("cache", help="precompute per-token NLL of the base (or a reference) model",
                           description="Run a model once over the training data and store its per-token NLL.")
    cache.add_argument("--config", help="YAML recipe (default: the demo recipe)")
    cache.add_argument("--model", help="model to score with (default: the recipe's model)")
    cache.add_argument("--adapter", help="a PEFT adapter to apply to the model (e.g. a reference model)")
    cache.add_argument("--out", help="cache directory (default: the recipe's history_cache)")
    cache.add_argument("--reference", action="store_true", help="write to the recipe's reference_cache")
    cache.set_defaults(handler=cmd_cache, takes_overrides=True)


def cmd_cache(ns, overrides: list[str]) -> int:
    from sstoken.models import load_model
    from sstoken.selection.nll_cache import build_nll_cache

    run, config = prepare_run(ns.config, overrides)
    model_name = ns.model or run["model"]
    out = ns.out or (config.reference_cache if ns.reference else config.history_cache)
    if not out:
        raise ConfigError("where should the cache go? set history_cache in the recipe or pass --out DIR")
    out = str(Path(out).expanduser())
    check_output_folder(out, "cache folder", CACHE_MARKERS)
    if ns.adapter and not (Path(ns.adapter).expanduser() / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter {ns.adapter} is not a PEFT adapter folder (no adapter_config.json there)")
    tokenizer = load_run_tokenizer(model_name, run, config)  # the cache must hold the rows training will encode
    rows, _ = load_run_rows(run["data"], tokenizer, run["max_seq_length"], config)
    rows = rows.to_list()  # the very rows train uses: same spec, tokenizer, max_seq_length and mixture seed
    model = load_model(model_name, run["dtype"], run["attn_implementation"], run["trust_remote_code"],
                       extra_kwargs=config.model_init_kwargs, quantization=run["quantization"],
                       device=config.device.type)
    if ns.adapter:
        from sstoken.models import load_adapter

        model = load_adapter(model, ns.adapter)
    started = time.time()
    cache = build_nll_cache(model, tokenizer, rows, out, run["max_seq_length"], batch_size=run["cache_batch_size"])
    print(f"sstoken cache: {len(cache)} samples written to {out} in {time.time() - started:.1f}s")
    return 0
