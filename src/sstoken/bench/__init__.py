"""Benchmarks behind ``sstoken bench``.

They live inside the package (not in a top-level ``bench/`` folder) so that ``sstoken bench ...`` works from an
installed copy; ``bench/`` at the repository root only holds committed results and helper scripts.

* :mod:`sstoken.bench.overhead`: training-step time and peak memory of plain SFT against the ssToken variants
  (``sstoken bench overhead``), plus the two smaller measurements it reports with them,
  :mod:`sstoken.bench.attention_memory` and :mod:`sstoken.bench.cache_throughput`.
* ``sstoken.bench.quality`` (optional module): ``sstoken bench quality``; :mod:`sstoken.bench_cli` registers it
  when it exists.
"""
