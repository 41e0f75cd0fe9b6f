"""Selection snapshots: REL and attention share of the response tokens at a few training steps.

:class:`SelectionSnapshots` is a selection listener (see :class:`sstoken.training.trainer.SelectionEvent`) that every
:class:`~sstoken.training.trainer.SSTokenTrainer` registers: at the steps chosen by :func:`snapshot_steps` it folds the
micro-batch's response tokens into ``trainer.selection_snapshots`` and (main process only) rewrites
``output_dir/selection_snapshots.json``, so that ``sstoken report`` can draw their distributions even if training
stops early. It lives in the library, not in the report command, because the trainer owns what it records.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from sstoken.errors import SSTokenError
from sstoken.io import atomic_write_text

logger = logging.getLogger(__name__)

SNAPSHOTS_FILE = "selection_snapshots.json"
SNAPSHOT_POINTS = 5  # distributions are drawn at this many evenly spaced training steps
SNAPSHOT_MAX_VALUES = 4000  # per signal per snapshot: enough for a histogram, small enough for a JSON file


class SnapshotFileError(SSTokenError):
    """``selection_snapshots.json`` exists but cannot be read."""


def snapshot_steps(max_steps: int, points: int = SNAPSHOT_POINTS) -> list[int]:
    """``points`` evenly spaced 1-based optimizer steps from 1 to ``max_steps`` (fewer if there are fewer steps)."""
    if max_steps < 1 or points < 1:
        return []
    if points == 1 or max_steps == 1:
        return [max_steps] if points == 1 else [1]
    return sorted({1 + round(k * (max_steps - 1) / (points - 1)) for k in range(points)})


def thin(values: list, limit: int) -> list:
    """At most ``limit`` values, taken at an even stride so that the distribution is kept."""
    if limit <= 0:
        return []
    if len(values) <= limit:
        return list(values)
    stride = len(values) / limit
    return [values[int(k * stride)] for k in range(limit)]


def _round(value: float) -> float:
    return float(f"{value:.5g}")


def read_snapshots(run_dir: Path) -> list[dict]:
    """The snapshots saved in ``run_dir`` ([] when there is no file); raises SnapshotFileError when unreadable."""
    path = Path(run_dir) / SNAPSHOTS_FILE
    if not path.exists():
        return []
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        snapshots = payload["snapshots"]
        for snap in snapshots:
            int(snap["step"])
            for key in ("rel", "attention_share", "kept"):
                if not isinstance(snap[key], list):
                    raise TypeError(f"{key} is not a list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SnapshotFileError(f"{path} is unreadable ({exc}); delete it to plot the curves alone") from None
    return snapshots


def _selection_values(signals, keep, response):
    """(REL or None, attention share or None, kept flags) of the response tokens, as Python lists."""
    from sstoken.selection import scoring

    mask = response.bool()
    rel = share = None
    if signals.history_nll is not None:
        rel_t = scoring.retrospective_excess_loss(signals.history_nll.to(signals.current_nll.device),
                                                  signals.current_nll)
        rel = rel_t[mask].float().cpu().tolist()
    if signals.context_share is not None:
        share = signals.context_share[mask.to(signals.context_share.device)].float().cpu().tolist()
    kept = keep.to(mask.device)[mask].cpu().tolist()
    return rel, share, kept


class SnapshotRecorder:
    """REL and attention share of the response tokens at a few evenly spaced training steps."""

    def __init__(self, max_steps: int, points: int = SNAPSHOT_POINTS, max_values: int = SNAPSHOT_MAX_VALUES):
        self.steps = set(snapshot_steps(max_steps, points))
        self.max_values = max_values
        self.snapshots: list[dict] = []

    def wants(self, step: int) -> bool:
        return step in self.steps

    def add(self, step: int, rel: list[float] | None, share: list[float] | None, kept: list[bool]) -> bool:
        """Fold one micro-batch into the snapshot of ``step``; returns whether anything was added."""
        if not self.wants(step):
            return False
        snap = next((s for s in self.snapshots if s["step"] == step), None)
        if snap is None:
            snap = {"step": step, "rel": [], "attention_share": [], "kept": []}
            self.snapshots.append(snap)
            self.snapshots.sort(key=lambda s: s["step"])
        room = self.max_values - len(snap["kept"])
        if room <= 0:
            return False
        # Thin the positions once so the REL, attention and kept lists stay aligned token by token.
        picks = thin(list(range(len(kept))), room)
        if rel is not None:
            snap["rel"].extend(_round(rel[i]) for i in picks)
        if share is not None:
            snap["attention_share"].extend(_round(share[i]) for i in picks)
        snap["kept"].extend(bool(kept[i]) for i in picks)
        return True


class SelectionSnapshots:
    """Selection listener that records snapshots; the recorder is made at the first event, when max_steps is known."""

    def __init__(self):
        self.recorder: SnapshotRecorder | None = None

    @property
    def snapshots(self) -> list[dict]:
        return [] if self.recorder is None else self.recorder.snapshots

    def __call__(self, event) -> None:
        trainer = event.trainer
        if self.recorder is None:
            self.recorder = SnapshotRecorder(int(trainer.state.max_steps or 0))
            if trainer.state.global_step > 0:  # resumed: keep the snapshots taken before the checkpoint
                try:
                    earlier = read_snapshots(Path(trainer.args.output_dir))
                except SnapshotFileError:
                    earlier = []
                self.recorder.snapshots = [s for s in earlier if s["step"] <= trainer.state.global_step]
        signals = event.signals
        if not self.recorder.wants(event.step) or (signals.history_nll is None and signals.context_share is None):
            return  # not a snapshot step, or a selector (full, random) that computes neither signal
        rel, share, kept = _selection_values(signals, event.keep, signals.response_mask)
        if not kept:
            return  # no response token in this micro-batch
        if self.recorder.add(event.step, rel, share, kept) and trainer.is_world_process_zero():
            payload = {"max_steps": int(trainer.state.max_steps or 0),
                       "method": getattr(trainer.selector, "name", None), "snapshots": self.recorder.snapshots}
            try:
                Path(trainer.args.output_dir).mkdir(parents=True, exist_ok=True)
                atomic_write_text(Path(trainer.args.output_dir) / SNAPSHOTS_FILE,
                                  json.dumps(payload, separators=(",", ":")))
            except OSError as exc:  # plots are a by-product: never stop training for them
                logger.warning("selection snapshots not saved: %s", exc.strerror or exc)
