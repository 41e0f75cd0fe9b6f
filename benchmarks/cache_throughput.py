"""``sstoken cache`` throughput against a plain no-grad forward over the same batches.

Both sides see identical batches: the cache builder's own plan (unique samples sorted by length, cut into
batches of ``batch_size``, right-padded). The cache side is the whole :func:`sstoken.selection.history.build_nll_cache`
call into a fresh directory (fingerprints, per-token NLL, shard writes with checksums, the verifying re-open);
the plain side is only ``model(input_ids, attention_mask)`` under ``torch.no_grad()``. Runs alternate after a
warm-up of each, in one process with one loaded model.
"""

from __future__ import annotations

import statistics
import time
import traceback
from pathlib import Path

import common


def _batches(rows, batch_size: int, pad_id: int):
    from sstoken.batch import pad_rows
    from sstoken.selection.nll_cache import plan_shards, sample_key

    by_key = {sample_key(r["input_ids"]): r for r in rows}
    ordered = [key for shard in plan_shards(rows, shard_size=1024) for key in shard]
    for start in range(0, len(ordered), batch_size):
        keys = ordered[start:start + batch_size]
        ids, _, mask = pad_rows([by_key[k] for k in keys], pad_id)
        yield ids, mask


def _measure_main(conn, spec: dict) -> None:
    try:
        import torch

        torch.set_num_threads(spec["threads"])
        from sstoken.data.sources import load_training_rows
        from sstoken.models import load_tokenizer
        from sstoken.selection.nll_cache import build_nll_cache

        device = "cuda" if spec["device"] == "cuda" else "cpu"
        tokenizer = load_tokenizer(spec["model_dir"])
        rows, _ = load_training_rows(spec["data"], tokenizer, spec["max_seq_length"])
        rows = rows[:spec["rows"]]
        model = common.load_bench_model(spec["model_dir"], spec["random_init"]).to(device).eval()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        batches = list(_batches(rows, spec["batch_size"], pad_id))
        counter = [0]

        def sync():
            if device == "cuda":
                torch.cuda.synchronize()

        def plain() -> float:
            sync()
            start = time.perf_counter()
            with torch.no_grad():
                for ids, mask in batches:
                    model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            sync()
            return time.perf_counter() - start

        def cache() -> float:
            counter[0] += 1
            sync()
            start = time.perf_counter()
            build_nll_cache(model, tokenizer, rows, Path(spec["workdir"]) / f"throughput-{counter[0]}",
                            spec["max_seq_length"], batch_size=spec["batch_size"], progress=False)
            sync()
            return time.perf_counter() - start

        def fixed() -> float:
            # What a build costs beyond the forward when the data is a single sample: fingerprinting the model's
            # weights and the tokenizer's vocabulary, writing and checksumming the index and one shard, verifying
            # on re-open. Paid once per cache (per 1024-sample shard for the file work), whatever its size.
            counter[0] += 1
            one = rows[:1]
            ids = torch.tensor([one[0]["input_ids"]], device=device)
            sync()
            start = time.perf_counter()
            with torch.no_grad():
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            sync()
            forward_one = time.perf_counter() - start
            start = time.perf_counter()
            build_nll_cache(model, tokenizer, one, Path(spec["workdir"]) / f"throughput-{counter[0]}",
                            spec["max_seq_length"], batch_size=spec["batch_size"], progress=False)
            sync()
            return max(0.0, time.perf_counter() - start - forward_one)

        plain()
        cache()  # warm-up of both
        times = {"forward": [], "cache": [], "fixed": []}
        for index in range(spec["repeats"]):
            for name in (("forward", "cache") if index % 2 == 0 else ("cache", "forward")):
                times[name].append(plain() if name == "forward" else cache())
            times["fixed"].append(fixed())
        conn.send(("ok", {
            "rows": len(rows),
            "tokens": sum(len(r["input_ids"]) for r in rows),
            "batch_size": spec["batch_size"],
            "max_seq_length": spec["max_seq_length"],
            "repeats": spec["repeats"],
            "forward_s": statistics.median(times["forward"]),
            "cache_s": statistics.median(times["cache"]),
            "fixed_s": statistics.median(times["fixed"]),
            "forward_s_all": [round(t, 4) for t in times["forward"]],
            "cache_s_all": [round(t, 4) for t in times["cache"]],
        }))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def run(model_dir: str, data: str, device: str, threads: int, workdir: Path, rows: int = 96,
        max_seq_length: int = 512, batch_size: int = 8, repeats: int = 3, random_init: bool = False) -> dict:
    spec = {"model_dir": model_dir, "data": data, "device": device, "threads": threads, "workdir": str(workdir),
            "random_init": random_init,
            "rows": rows, "max_seq_length": max_seq_length, "batch_size": batch_size, "repeats": repeats}
    payload = common.run_in_worker(_measure_main, (spec,), "cache-throughput", 3600)
    payload["throughput_ratio"] = round(payload["forward_s"] / payload["cache_s"], 4)
    # Per-sample speed once the one-off fingerprinting is paid: what matters on a real data set, where the
    # fixed part is spread over thousands of samples rather than a benchmark's few dozen.
    payload["steady_throughput_ratio"] = round(payload["forward_s"] / max(1e-9, payload["cache_s"] - payload["fixed_s"]), 4)
    print(f"[bench] cache throughput: cache {payload['cache_s']:.2f}s vs forward {payload['forward_s']:.2f}s "
          f"-> ratio {payload['throughput_ratio']:.3f}", flush=True)
    return payload
