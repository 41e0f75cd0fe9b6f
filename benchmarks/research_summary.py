"""``python benchmarks/research_summary.py RESULT.json [...]``: the selection-research tables (BENCHMARKS.md).

Per method: clean-answer NLL mean ± sample sd over seeds, its 95% t-interval, the kept fractions, and the paired
(same seed = same data, init and batch order) difference to full_noisy and to the reference-free baselines,
with a 95% t-interval; "beyond the seed spread" below means that interval excludes 0. For x_full_probe records it
also prints the signal-separation tables (ROC area of each signal against each noise kind).
"""

from __future__ import annotations

import json
import statistics
import sys

# two-sided 95% t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
BAR = 1.913  # the bar: half the gap between full SFT on noisy (2.286) and on clean data (1.540)


def ci(values: list[float]) -> tuple[float, float, float, float]:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    half = T95.get(len(values) - 1, 1.96) * sd / len(values) ** 0.5 if len(values) > 1 else float("nan")
    return mean, sd, mean - half, mean + half


def table(records: list[dict], compare: tuple[str, ...] = ("full_noisy", "random", "rho1", "sstoken")) -> str:
    by = {}
    for r in records:
        by.setdefault(r["method"], {})[r["seed"]] = r
    head = ["method", "n", "clean-answer NLL mean ± sd", "95% CI", "kept noise", "kept clean", "kept answer", "kept first",
            "kept boilerplate / wrong / corrupt"] + [f"Δ vs {c} [95% CI]" for c in compare if c in by]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, seeds in by.items():
        nll = [seeds[s]["nll"] for s in sorted(seeds)]
        mean, sd, lo, hi = ci(nll)
        kept = [seeds[s]["kept"]["all"] for s in sorted(seeds) if seeds[s].get("kept")]

        def k(kind, kept=kept):
            vals = [x.get(kind) for x in kept if x.get(kind) is not None]
            return f"{statistics.fmean(vals):.2f}" if vals else "-"

        row = [method, str(len(nll)), f"{mean:.3f} ± {sd:.3f}", f"[{lo:.3f}, {hi:.3f}]", k("noise"), k("clean"),
               k("answer"), k("first"), f"{k('boilerplate')} / {k('wrong_fact')} / {k('corrupt')}"]
        for other in compare:
            if other not in by:
                continue
            if other == method:
                row.append("-")
                continue
            common = sorted(set(seeds) & set(by[other]))
            d = [seeds[s]["nll"] - by[other][s]["nll"] for s in common]
            dm, _, dlo, dhi = ci(d)
            mark = " *" if (dhi < 0 or dlo > 0) else ""
            row.append(f"{dm:+.3f} [{dlo:+.3f}, {dhi:+.3f}]{mark}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)



def separation_table(records: list[dict], target: str = "boilerplate+corrupt") -> str:
    """Mean over seeds of each signal's ROC area against ``target`` noise, and the clean tokens a global threshold
    would drop to catch 90% of it, per half of a full-SFT run (x_full_probe records)."""
    recs = [r for r in records if r.get("signal_separation")]
    if not recs:
        return ""
    signals = list(recs[0]["signal_separation"]["first_half"])
    header = (f"| signal ({target} vs clean) | AUC 1st half | AUC 2nd half | noise is | clean dropped at 90% recall "
              "(1st / 2nd half) |")
    lines = [header, "|---|---|---|---|---|"]
    for signal in signals:
        cells = {}
        for half in ("first_half", "second_half"):
            vals = [r["signal_separation"][half][signal][target] for r in recs]
            a_mean, a_sd, _, _ = ci([v["auc"] for v in vals])
            cells[half] = (a_mean, a_sd, statistics.fmean(v["clean_dropped_at_90pct_noise_recall"] for v in vals),
                           "/".join(sorted({v["noise_is"] for v in vals})))
        f, s = cells["first_half"], cells["second_half"]
        lines.append(f"| {signal} | {f[0]:.3f} ± {f[1]:.3f} | {s[0]:.3f} ± {s[1]:.3f} | {f[3]} → {s[3]} | "
                     f"{f[2]:.2f} / {s[2]:.2f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    compare = ("full_noisy", "random", "rho1", "tokencleaning", "rel", "attn", "sstoken")
    for path in argv:
        with open(path) as f:
            data = json.load(f)
        print(f"### {path} ({data['date']}, {len({r['seed'] for r in data['records']})} seeds)\n")
        print(table(data["records"], compare))
        print(f"\n(* = the paired 95% interval excludes 0; bar: NLL ≤ {BAR})\n")
        if any(r.get("signal_separation") for r in data["records"]):
            for target in ("boilerplate+corrupt", "boilerplate", "corrupt", "wrong_fact"):
                print(separation_table(data["records"], target) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
