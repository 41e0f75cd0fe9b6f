"""The ``sstoken`` command: one module per subcommand, each adding its parser with ``register_cli``.

Every user error (bad data, bad configuration, a cache that does not match) ends with one line on stderr
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from sstoken.errors import SSTokenError, one_line

COMMANDS = ("train", "cache", "eval", "compare", "inspect", "report")
"""The subcommands (modules of :mod:`sstoken.cli`), in the order ``sstoken --help`` lists them. Each module is cheap
to import: what a command needs is imported when it runs."""

USAGE_EXAMPLES = """\
examples:
  sstoken train                                  # the demo: embedded SmolLM2-135M + LoRA on the demo data
  sstoken train --config recipe.yaml --rho 0.5   # flags override the YAML file
  sstoken cache --config recipe.yaml             # precompute the base model's NLL (history_cache)
  sstoken train --help-config                    # every configuration key
  sstoken eval runs/demo                         # score a run with lm-eval-harness on local tasks
  sstoken compare --config recipe.yaml --methods full sstoken --eval_data held_out.jsonl
"""


def build_parser() -> argparse.ArgumentParser:
    from sstoken import __version__

    parser = argparse.ArgumentParser(
        prog="sstoken",
        description="Token selection (ssToken and peers) for LLM supervised fine-tuning on the Hugging Face stack.",
        epilog=USAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sstoken {__version__}")
    parser.set_defaults(takes_overrides=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        importlib.import_module(f"sstoken.cli.{command}").register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "datasets", "accelerate", "peft", "trl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # PEFT imports bitsandbytes whenever it is installed; on a CPU with AVX512-BF16 its import then tries to fetch a
    # 4-bit kernel from the Hub and warns when it cannot, although its own CPU code serves instead.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    parser = build_parser()
    ns, rest = parser.parse_known_args(argv)
    if ns.command is None:
        parser.print_help()
        return 0
    if rest and not ns.takes_overrides:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(ns.handler(ns, rest) or 0)
    except SSTokenError as exc:
        # One line whatever the message holds: YAML and PEFT errors span several, file names can hold control
        # characters, and a quoted value can be huge.
        print(f"sstoken: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sstoken: interrupted", file=sys.stderr)
        return 130

