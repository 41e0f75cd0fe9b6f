"""Seeing the selection: ``sstoken inspect`` (per-token HTML/JSON) and training plots (``sstoken report``).

``inspect`` scores a few samples the way the trainer does (one forward pass with the context-share probe,
per-token NLL, REL against the history model, the chosen selector) and writes one self-contained HTML page
(see :mod:`sstoken.inspect_html`) plus, optionally, the same numbers as JSON.

The training plots read ``log_history.json`` (written by ``sstoken train``) and ``selection_snapshots.json``:
the trainer's snapshot listener (:mod:`sstoken.snapshots`) keeps the response tokens' REL and attention share at a
few evenly spaced steps so their distributions can be drawn later.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from sstoken.batch import pad_rows
from sstoken.data import demo_data_path
from sstoken.errors import ConfigError, SSTokenError
from sstoken.io import atomic_write_text
from sstoken.snapshots import SnapshotFileError, read_snapshots

logger = logging.getLogger("sstoken")

INSPECT_METHODS = ("sstoken", "rel", "attn", "random", "full")
LOG_HISTORY_FILE = "log_history.json"
CURVES_PNG = "training_curves.png"
DISTRIBUTIONS_PNG = "selection_distributions.png"


class ReportError(SSTokenError):
    """A run directory or inspection input that cannot be reported on."""


# ============================================================================================ pure helpers
def token_pieces(token_ids: list[int], decode) -> list[str]:
    """The text each token adds when the sequence is decoded, so that the pieces join to the decoded text.

    ``decode(ids) -> str``. Decoding tokens one at a time loses what depends on neighbours (SentencePiece's
    leading-space marker, a character split over several byte tokens), so each piece is the difference
    between decoding a short run of tokens with and without it, the run starting at the last token that
    ended on a whole character. Tokens holding only the leading bytes of a character get ``""`` and the token
    that completes it gets the whole character.
    """
    pieces = []
    prefix_start = read_start = 0  # decode from prefix_start; text up to read_start is already handed out
    for i in range(len(token_ids)):
        prefix = decode(token_ids[prefix_start:read_start])
        text = decode(token_ids[prefix_start:i + 1])
        last = i == len(token_ids) - 1
        if not text.startswith(prefix):  # the decoder rewrote earlier text (clean-up rules)
            pieces.append(decode(token_ids[i:i + 1]))
            prefix_start = read_start = i + 1
        elif text.endswith("\ufffd") and not last:
            pieces.append("")  # an incomplete character: wait for the token that completes it
        else:
            pieces.append(text[len(prefix):])
            prefix_start, read_start = read_start, i + 1
    return pieces


def mean_or_none(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def sample_summary(tokens: list[dict]) -> dict:
    """Counts and mean signals over one sample's response tokens (the numbers in the page header)."""
    response = [t for t in tokens if t["role"] == "response"]
    return {
        "n_tokens": len(tokens),
        "n_response": len(response),
        "n_kept": sum(1 for t in response if t["kept"]),
        "mean_rel": mean_or_none([t["rel"] for t in response]),
        "mean_attention_share": mean_or_none([t["attention_share"] for t in response]),
        "mean_score": mean_or_none([t["score"] for t in response]),
        "mean_nll": mean_or_none([t["nll"] for t in response]),
    }


def score_gamma(method: str, gamma: float) -> float:
    """The γ of the score a method ranks by: REL alone is γ=1, attention alone γ=0.

    ``random`` and ``full`` rank by nothing; their page shows the ssToken score with the given γ for reference.
    """
    return {"rel": 1.0, "attn": 0.0}.get(method, gamma)


def shared_bins(value_lists: list[list[float]], bins: int = 30) -> list[float]:
    """Histogram edges common to several lists, so that their overlaid histograms compare bin by bin."""
    values = [v for values in value_lists for v in values if math.isfinite(v)]
    if not values:
        return [0.0, 1.0]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:  # all equal (e.g. REL at step 1): one visible bar around the value
        lo, hi = lo - 0.5, hi + 0.5
    return [lo + (hi - lo) * k / bins for k in range(bins + 1)]


# ============================================================================================ inspect
def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return ids


def score_batch(model, rows: list[dict], selector, gamma: float, probe, has_history_model: bool, pad_id: int,
                sstoken_head: bool):
    """Signals and keep mask of a batch of encoded rows, through the trainer's pipeline; tensors are B×T.

    :func:`sstoken.signals.select_tokens`, as in training: one forward pass of the current model captures the
    attention share; with ``has_history_model`` (a PEFT adapter) the base weights give the history NLL,
    otherwise history == current and REL is 0. ``sstoken_head``: the model runs sstoken's head
    (:func:`sstoken.lm_head.use_sstoken_head`), else the full logits.
    """
    import torch

    from sstoken import scoring
    from sstoken.signals import BaseModelHistory, CurrentModelHistory, SignalSources, select_tokens

    ids, labels, attention = pad_rows(rows, pad_id)
    inputs = {"input_ids": ids, "attention_mask": attention, "labels": labels}
    sources = SignalSources(history=BaseModelHistory() if has_history_model else CurrentModelHistory(),
                            probe=probe, sstoken_head=sstoken_head)
    with torch.no_grad():
        selection = select_tokens(model, inputs, selector, sources, progress=1.0)
    signals, response = selection.signals, selection.layout.response
    nll, history, share = signals.current_nll, signals.history_nll, signals.context_share
    rel = scoring.retrospective_excess_loss(history, nll)
    return {"ids": ids, "valid": selection.layout.valid, "response": response, "nll": nll, "history": history,
            "rel": rel, "rel_norm": scoring.minmax_normalize(rel, response), "share": share,
            "score": scoring.sstoken_scores(history, nll, share, response, gamma), "keep": selection.keep}


def sample_records(batch: dict, row: int, pieces: list[str], special: set[int]) -> list[dict]:
    """Per-token dicts of one row of :func:`score_batch`; signals are ``None`` on context tokens."""
    tokens = []
    n = int(batch["valid"][row].sum().item())
    for pos in range(n):
        token_id = int(batch["ids"][row, pos].item())
        is_response = bool(batch["response"][row, pos].item())

        def value(name):
            return float(batch[name][row, pos].item()) if is_response else None

        tokens.append({
            "position": pos,
            "id": token_id,
            "text": pieces[pos],
            "special": token_id in special,
            "role": "response" if is_response else "context",
            "nll": value("nll"),
            "history_nll": value("history"),
            "rel": value("rel"),
            "rel_norm": value("rel_norm"),
            "attention_share": value("share"),
            "score": value("score"),
            "kept": bool(batch["keep"][row, pos].item()),
        })
    return tokens


def inspect_samples(model, tokenizer, rows: list[dict], *, method: str = "sstoken", rho: float = 0.6,
                    gamma: float = 0.5, layer: int = -1, has_history_model: bool = False, batch_size: int = 4,
                    seed: int = 0, settings: dict | None = None) -> dict:
    """Score ``rows`` (encoded ``input_ids`` / ``labels``) and return the page/JSON data."""
    from sstoken.attention import ContextShareProbe
    from sstoken.lm_head import use_sstoken_head
    from sstoken.selection import make_selector

    if method not in INSPECT_METHODS:
        raise ConfigError(f"unknown inspect method {method!r}; choose one of {', '.join(INSPECT_METHODS)}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    selector = make_selector(method, rho=rho, gamma=gamma, seed=seed)
    effective_gamma = score_gamma(method, gamma)
    model.eval()
    probe = ContextShareProbe(model, layer=layer)
    sstoken_head = use_sstoken_head(model, "inspect") is None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    special = _special_ids(tokenizer)

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    samples = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = score_batch(model, chunk, selector, effective_gamma, probe, has_history_model, pad_id, sstoken_head)
        for row, encoded in enumerate(chunk):
            tokens = sample_records(batch, row, token_pieces(list(encoded["input_ids"]), decode), special)
            samples.append({"index": start + row, "tokens": tokens, "summary": sample_summary(tokens)})

    notes = []
    if not has_history_model:
        notes.append("No adapter given: the current model is the base model, so the history NLL equals the "
                     "current NLL and REL is 0 for every token. The score reduces to (1−γ)·attention share. "
                     "Pass --adapter with a trained LoRA adapter to see REL.")
        if method == "rel":
            notes.append("With REL = 0 everywhere the 'rel' selector has nothing to rank by: it keeps the "
                         "earliest tokens (ties break by position).")
    if method in ("random", "full"):
        notes.append(f"The '{method}' selector does not rank by score; the shading shows the ssToken score "
                     f"with γ={gamma} for comparison.")
    merged = {"method": method, "rho": 1.0 if method == "full" else rho, "gamma": gamma,
              "score_gamma": effective_gamma, "layer": probe.layer_index, "samples": len(samples),
              "history": "base model (adapter disabled)" if has_history_model else "none (current model = base)",
              "default_mode": {"rel": "rel", "attn": "attn"}.get(method, "score")}
    merged.update(settings or {})
    return {"settings": merged, "notes": notes, "samples": samples}


def _load_for_inspect(ns):
    from sstoken.cli import load_rows
    from sstoken.models import load_model, load_tokenizer
    from sstoken.selection import check_gamma, check_rho

    from sstoken.sources import check_data_spec

    from sstoken.recipe import data_flag

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
    from sstoken.inspect_html import render_page
    from sstoken.models import EMBEDDED_MODEL

    model, tokenizer, rows = _load_for_inspect(ns)
    data = ("demo.jsonl (bundled demo data)" if isinstance(ns.data, str) and Path(ns.data) == Path(demo_data_path())
            else ns.data)
    settings = {"model": ns.model or f"{EMBEDDED_MODEL} (embedded)", "adapter": ns.adapter, "data": data,
                "max_seq_length": ns.max_seq_length}
    result = inspect_samples(model, tokenizer, rows, method=ns.method, rho=ns.rho, gamma=ns.gamma,
                             layer=ns.layer, has_history_model=bool(ns.adapter), batch_size=ns.batch_size,
                             seed=ns.seed, settings=settings)
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


def _read_snapshots(run_dir: Path) -> list[dict]:
    try:
        return read_snapshots(run_dir)
    except SnapshotFileError as exc:
        raise ReportError(str(exc)) from None


# ============================================================================================ plots
CURVE_PANELS = (
    # (title, [(log key, label)])
    ("Loss (NLL) on response tokens", [("loss_all", "all response tokens"), ("loss_kept", "kept tokens")]),
    ("Kept fraction", [("kept_fraction", "kept / response tokens")]),
    ("Mean REL (history NLL − current NLL)", [("mean_rel", "mean REL")]),
    ("Mean context-attention share", [("mean_attention_share", "mean attention share")]),
)


def curve_series(log_history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one logged training metric; evaluation entries and non-finite values are skipped."""
    steps, values = [], []
    for entry in log_history:
        if key in entry and "step" in entry and isinstance(entry[key], (int, float)) and math.isfinite(entry[key]):
            steps.append(entry["step"])
            values.append(float(entry[key]))
    return steps, values


def _read_log_history(run_dir: Path) -> list[dict]:
    if not run_dir.is_dir():
        raise ReportError(f"run directory {run_dir} does not exist")
    path = run_dir / LOG_HISTORY_FILE
    if not path.exists():
        raise ReportError(f"{run_dir} has no {LOG_HISTORY_FILE}: is it the output_dir of a finished "
                          f"`sstoken train` run?")
    try:
        history = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise ReportError(f"{path} must be a list of log entries")
    keys = [key for _, series in CURVE_PANELS for key, _ in series]
    if not any(curve_series(history, key)[0] for key in keys):
        raise ReportError(f"{path} has no logged training steps (none of {', '.join(keys)}); "
                          f"train with logging_steps smaller than max_steps")
    return history


def _figure():
    """A 2×2 figure drawn by Agg without pyplot, so no global backend or window state is touched."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6.4), layout="constrained")
    return fig, fig.subplots(2, 2)


def _plot_curves(history: list[dict], path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure()
    for ax, (title, series) in zip(axes.flat, CURVE_PANELS):
        drawn = False
        for key, label in series:
            steps, values = curve_series(history, key)
            if steps:
                ax.plot(steps, values, marker="o", markersize=3, linewidth=1.5, label=label)
                drawn = True
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "not logged by this selection method", ha="center", va="center",
                    transform=ax.transAxes, color="#777")
        elif len(series) > 1:
            ax.legend(fontsize=8)
    fig.suptitle("sstoken training", fontsize=11)
    fig.savefig(path, dpi=110)


def _plot_distributions(snapshots: list[dict], path: Path) -> None:
    import matplotlib

    fig, axes = _figure()
    cmap = matplotlib.colormaps["viridis"]
    signals = (("rel", "REL of response tokens"), ("attention_share", "Attention share of response tokens"))
    for column, (key, title) in enumerate(signals):
        ax = axes[0, column]
        drawn = False
        edges = shared_bins([snap[key] for snap in snapshots])
        for n, snap in enumerate(snapshots):
            if snap[key]:
                color = cmap(n / max(1, len(snapshots) - 1))
                ax.hist(snap[key], bins=edges, histtype="step", density=True, linewidth=1.6, color=color,
                        label=f"step {snap['step']}")
                drawn = True
        ax.set_title(title + " over training", fontsize=10)
        ax.set_ylabel("density")
        if drawn:
            ax.legend(fontsize=8)
        # Kept versus dropped tokens at the latest snapshot that has the signal: what the selector prefers.
        ax = axes[1, column]
        latest = next((s for s in reversed(snapshots) if s[key] and len(s[key]) == len(s["kept"])), None)
        if latest is not None:
            kept = [v for v, k in zip(latest[key], latest["kept"]) if k]
            dropped = [v for v, k in zip(latest[key], latest["kept"]) if not k]
            for values, label, color in ((kept, "kept", "#13795b"), (dropped, "dropped", "#b42318")):
                if values:
                    ax.hist(values, bins=edges, alpha=0.55, density=True, color=color, label=f"{label} ({len(values)})")
            ax.legend(fontsize=8)
            ax.set_title(f"{title.split(' of ')[0]}: kept vs dropped at step {latest['step']}", fontsize=10)
        else:
            ax.set_title(title.split(" of ")[0] + ": kept vs dropped", fontsize=10)
        if not drawn:
            for a in (axes[0, column], axes[1, column]):
                a.text(0.5, 0.5, "not computed by this selection method", ha="center", va="center",
                       transform=a.transAxes, color="#777")
        ax.set_xlabel({"rel": "REL"}.get(key, key.replace("_", " ")))
        ax.set_ylabel("density")
    fig.suptitle("Selection signals at a few points of training", fontsize=11)
    fig.savefig(path, dpi=110)


def write_training_plots(run_dir) -> list[Path]:
    """Write the training PNGs into ``run_dir``; returns their paths.

    ``training_curves.png``: loss on kept vs all response tokens, kept fraction, mean REL and mean attention
    share per logged step. ``selection_distributions.png`` (when the run recorded snapshots): distributions of
    REL and attention share at a few steps, and kept versus dropped tokens at the last of them.
    """
    run_dir = Path(run_dir)
    history = _read_log_history(run_dir)
    snapshots = _read_snapshots(run_dir)
    written = []
    try:
        _plot_curves(history, run_dir / CURVES_PNG)
        written.append(run_dir / CURVES_PNG)
        if snapshots:
            _plot_distributions(snapshots, run_dir / DISTRIBUTIONS_PNG)
            written.append(run_dir / DISTRIBUTIONS_PNG)
    except OSError as exc:
        raise ReportError(f"cannot write plots into {run_dir}: {exc.strerror or exc}") from None
    return written


def cmd_report(ns, rest=None) -> int:
    paths = write_training_plots(ns.run_dir)
    print("sstoken report: wrote " + ", ".join(str(p) for p in paths))
    return 0


# ============================================================================================ CLI
def register_cli(subparsers) -> None:
    """Add ``inspect`` and ``report`` to the ``sstoken`` command."""
    inspect = subparsers.add_parser(
        "inspect", help="per-token HTML view of which tokens a selector keeps and why",
        description="Score a few samples and write a self-contained HTML page (and optionally JSON) showing "
                    "each token's REL, attention share and score, and which tokens are kept.")
    inspect.add_argument("--model", help="model path or name (default: the embedded SmolLM2-135M-Instruct)")
    inspect.add_argument("--adapter", help="trained PEFT adapter: the current model; the base is the history")
    inspect.add_argument("--data", default=demo_data_path(),
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
    inspect.add_argument("--data-seed", type=int, default=42,
                         help="shuffle seed of a mixture: the recipe's data_seed, else its seed (default 42, as train)")
    inspect.set_defaults(handler=cmd_inspect)

    report = subparsers.add_parser(
        "report", help="(re)draw the training plots of a run directory",
        description="Read log_history.json (and selection_snapshots.json) in RUN_DIR and write PNG plots there.")
    report.add_argument("run_dir", metavar="RUN_DIR", help="output_dir of an `sstoken train` run")
    report.set_defaults(handler=cmd_report)
