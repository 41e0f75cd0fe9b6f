"""``sstoken inspect``: a per-token HTML page (and JSON) of which tokens a selector keeps and why."""

from __future__ import annotations

import json
from pathlib import Path

from sstoken.demo import DEMO_DATA
from sstoken.errors import ConfigError, ReportError
from sstoken.io import atomic_write_text
from sstoken.report.inspector import INSPECT_METHODS, inspect_samples


def _load_for_inspect(ns):
    from sstoken.cli.recipe import data_flag
    from sstoken.data.sources import load_rows
    from sstoken.data.spec import check_data_spec
    from sstoken.models import load_model, load_tokenizer
    from sstoken.selection.selectors import check_gamma, check_rho

    ns.data = data_flag(ns.data)  # a path, or YAML such as '[{path: a.jsonl, fraction: 1}, ...]' like data:
    check_data_spec(ns.data, "--data", "data")
    if ns.samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {ns.samples}")
    check_rho(ns.rho)  # the selector's own checks, before the model loads so that a typo fails fast
    check_gamma(ns.gamma)
    if ns.adapter and not Path(ns.adapter).is_dir():
        raise ConfigError(f"adapter {ns.adapter} is not a directory (expected a saved PEFT adapter)")
    tokenizer = load_tokenizer(ns.model)
    # The same loader as train / cache: a mixture is shuffled with the recipe's data_seed (else seed).
    rows, _ = load_rows(ns.data, tokenizer, ns.max_seq_length, what="--data", seed=ns.data_seed)
    rows = rows.select(range(min(ns.samples, len(rows)))).to_list()
    model = load_model(ns.model, ns.dtype)
    if ns.adapter:
        from sstoken.models import load_adapter

        model = load_adapter(model, ns.adapter)
    return model, tokenizer, rows


def cmd_inspect(ns, rest=None) -> int:
    from sstoken.models import EMBEDDED_MODEL
    from sstoken.report.page import render_page

    model, tokenizer, rows = _load_for_inspect(ns)
    data = ("demo.jsonl (bundled demo data)" if isinstance(ns.data, str) and Path(ns.data) == Path(str(DEMO_DATA))
            else ns.data)
    settings = {"model": ns.model or f"{EMBEDDED_MODEL} (embedded)", "adapter": ns.adapter, "data": data,
                "max_seq_length": ns.max_seq_length}
    result = inspect_samples(model, tokenizer, rows, method=ns.method, rho=ns.rho, gamma=ns.gamma,
                             layer=ns.layer, has_history_model=bool(ns.adapter), batch_size=ns.batch_size,
                             seed=ns.seed, loss_type=ns.loss_type, settings=settings)
    _write_text(Path(ns.out), render_page(result))
    written = [ns.out]
    if ns.json:
        _write_text(Path(ns.json), json.dumps(result, indent=1, ensure_ascii=False))
        written.append(ns.json)
    kept = sum(s["summary"]["n_kept"] for s in result["samples"])
    response = sum(s["summary"]["n_response"] for s in result["samples"])
    print(f"sstoken inspect: {len(result['samples'])} samples, {kept} of {response} response tokens kept "
          f"({ns.method}); wrote {', '.join(written)}")
    return 0


def _write_text(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    except OSError as exc:
        raise ReportError(f"cannot write {path}: {exc.strerror or exc}") from exc


# ============================================================================================ CLI
def register_cli(subparsers) -> None:
    """Add ``inspect`` to the ``sstoken`` command."""
    inspect = subparsers.add_parser(
        "inspect", help="per-token HTML view of which tokens a selector keeps and why",
        description="Score a few samples and write a self-contained HTML page (and optionally JSON) showing "
                    "each token's REL, attention share and score, and which tokens are kept.")
    inspect.add_argument("--model", help="model path or name (default: the embedded SmolLM2-135M-Instruct)")
    inspect.add_argument("--adapter", help="trained PEFT adapter: the current model; the base is the history")
    inspect.add_argument("--data", default=str(DEMO_DATA),
                         help="data: a file, folder or Hub dataset id, like data: in a recipe (default: the demo data)")
    inspect.add_argument("--out", default="inspect.html", help="HTML file to write (default: inspect.html)")
    inspect.add_argument("--json", help="also write the per-token numbers to this JSON file")
    inspect.add_argument("--samples", type=int, default=8, help="number of samples, from the top (default 8)")
    inspect.add_argument("--method", choices=INSPECT_METHODS, default="sstoken", help="selector (default sstoken)")
    inspect.add_argument("--rho", type=float, default=0.6, help="fraction of response tokens kept (default 0.6)")
    inspect.add_argument("--gamma", type=float, default=0.5, help="weight of REL in the score (default 0.5)")
    inspect.add_argument("--layer", type=int, default=-1, help="attention layer of the share (default -1, last)")
    inspect.add_argument("--max-seq-length", type=int, default=512, help="truncate samples (default 512)")
    inspect.add_argument("--batch-size", type=int, default=4, help="samples per forward pass (default 4)")
    inspect.add_argument("--dtype", default=None, help="model dtype, e.g. float32, bfloat16 (default: auto)")
    inspect.add_argument("--seed", type=int, default=0, help="seed of the random selector")
    inspect.add_argument("--loss-type", choices=("nll", "dft"), default="nll",
                         help="dft: each token's loss weight includes DFT's p = exp(-NLL), as loss_type dft trains "
                              "(default nll: the data's weight fields alone)")
    inspect.add_argument("--data-seed", type=int, default=42,
                         help="shuffle seed of a mixture: the recipe's data_seed, else its seed (default 42, as train)")
    inspect.set_defaults(handler=cmd_inspect)
