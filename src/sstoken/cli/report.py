"""``sstoken report``: (re)draw the training plots of a run directory."""

from __future__ import annotations

from sstoken.report.plots import write_training_plots


def cmd_report(ns, rest=None) -> int:
    paths = write_training_plots(ns.run_dir)
    print("sstoken report: wrote " + ", ".join(str(p) for p in paths))
    return 0


def register_cli(subparsers) -> None:
    """Add ``report`` to the ``sstoken`` command."""
    report = subparsers.add_parser(
        "report", help="(re)draw the training plots of a run directory",
        description="Read log_history.json (and selection_snapshots.json) in RUN_DIR and write PNG plots there.")
    report.add_argument("run_dir", metavar="RUN_DIR", help="output_dir of an `sstoken train` run")
    report.set_defaults(handler=cmd_report)
