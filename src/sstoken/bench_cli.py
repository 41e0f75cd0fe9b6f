"""``sstoken bench``: the benchmarks, as sub-commands (``overhead``; ``quality`` when installed).

Every benchmark lives in the package under :mod:`sstoken.bench`, so ``sstoken bench ...`` works from an
installed copy. A benchmark module joins the command through a hook listed in ``_OPTIONAL`` that takes the
``bench`` sub-parsers, adds its own parser and sets ``handler=fn`` with ``fn(ns, rest) -> int``. Hooks run
whenever the ``sstoken`` parser is built, so a benchmark module must stay cheap to import (no torch at module
level).
"""

from __future__ import annotations

import importlib

# Optional benchmark modules and their registration hooks; a missing module is simply not offered.
_OPTIONAL = {"sstoken.bench.quality": "add_quality_parser"}


def register_cli(subparsers) -> None:
    from sstoken.bench import overhead

    bench = subparsers.add_parser("bench", help="benchmarks: selection overhead, selection quality",
                                  description="Benchmarks of sstoken. Results go to bench/results/ and BENCHMARKS.md.")
    inner = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    bench.set_defaults(handler=lambda ns, rest: _usage(bench))

    parser = inner.add_parser(
        "overhead",
        help="step time and peak memory of plain SFT vs the ssToken variants (plus attention memory, cache speed)",
        description=overhead.__doc__.split("\n\n")[0],
    )
    overhead.add_arguments(parser)
    parser.set_defaults(handler=overhead.cli)

    for name, hook in _OPTIONAL.items():
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # the module exists but one of its imports is missing: say so
                raise
            continue
        register = getattr(module, hook, None)
        if register is not None:
            register(inner)


def _usage(parser) -> int:
    parser.print_help()
    return 2
