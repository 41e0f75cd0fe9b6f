"""The training plots of a run directory (``sstoken report``, and at the end of ``sstoken train``).

They read ``log_history.json`` (written by ``sstoken train``) and ``selection_snapshots.json``: the trainer's
snapshot listener (:mod:`sstoken.training.snapshots`) keeps the response tokens' REL and attention share at a few
evenly spaced steps so their distributions can be drawn later.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from sstoken.errors import ReportError
from sstoken.training.snapshots import SnapshotFileError, read_snapshots

LOG_HISTORY_FILE = "log_history.json"


CURVES_PNG = "training_curves.png"


DISTRIBUTIONS_PNG = "selection_distributions.png"


def shared_bins(value_lists: list[list[float]], bins: int = 30) -> list[float]:
    """Histogram edges common to several lists, so that their overlaid histograms compare bin by bin."""
    values = [v for values in value_lists for v in values if math.isfinite(v)]
    if not values:
        return [0.0, 1.0]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:  # all equal (e.g. REL at step 1): one visible bar around the value
        lo, hi = lo - 0.5, hi + 0.5
    return [lo + (hi - lo) * k / bins for k in range(bins + 1)]


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
