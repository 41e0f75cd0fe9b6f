"""``bash benchmarks/gpu/check.sh``: sstoken's GPU paths in one short run on one GPU (about 5 of its 8 minutes).

Four parts; the JSON and Markdown are rewritten after each, so a run cut short keeps what it measured:

(a) ``numerics``: random-weight models of real shapes (Qwen2.5-0.5B and -1.5B classes, gemma-3-270m's 262k
    vocabulary), bf16 weights under bf16 autocast with a LoRA adapter on every linear layer, for each attention
    implementation that is installed (SDPA, FlashAttention-2 / 3). On one batch, the per-token NLL, the loss and
    the LoRA gradients from sstoken's head and from the model's full logits, each against the same model in
    float32; the ssToken keep set (REL against the adapter-free model) from each NLL against float32's; and the
    attention probe: the logits with it installed against without, its share against SDPA's.
(b) ``steps``: ``benchmarks/overhead.py`` at T=4096, B=4, bf16 weights, on the Qwen2.5-0.5B shape: stock TRL,
    TRL with Liger, sstoken with every token kept (``plain``), cached, online and EMA history, and cached with
    Liger. Step time and peak memory against stock TRL (Liger rows also against TRL with Liger), with the
    targets' verdict.
(c) ``qlora``: the same harness with the model quantized to 4 bits as it loads: stock TRL and sstoken online.
(d) ``gpu-check.json`` and ``gpu-check.md`` (the GPU named in both).

``--dry-run`` runs all of it on the CPU at test sizes (tiny shapes, T=64, B=2, eager attention standing in for
a second implementation, no Liger): the same code end to end, numbers meaningless. It is a test.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: common, overhead

import common  # noqa: E402
import overhead  # noqa: E402

SHAPES = ("qwen2.5-0.5b", "qwen2.5-1.5b", "gemma-3-270m")
STEP_SHAPE = "qwen2.5-0.5b"
# Against stock TRL in the same run, T=4096, B=4, bf16: (time ratio, peak-memory ratio).
TARGETS = {"sstoken-cached": (1.05, 1.02), "sstoken-online": (1.35, 1.05), "sstoken-ema": (1.40, 1.08)}
# The head passes when its error against float32 is at most this factor of the full logits' (plus a floor for
# errors that are both at rounding level).
HEAD_SLACK, HEAD_FLOOR = 1.25, 1e-3
RHO = 0.6
LORA_RANK = 16

GPU_SIZES = dict(seq_len=4096, numerics_batch=1, batch=4, repeats=5, warmup=2)
DRY_SIZES = dict(seq_len=64, numerics_batch=2, batch=2, repeats=1, warmup=0)


def log(message: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------------------------- verdicts
def head_verdict(head_error: float, full_error: float) -> bool:
    """sstoken's head is as close to float32 as the full logits are, within HEAD_SLACK (or both tiny)."""
    return head_error <= HEAD_SLACK * full_error + HEAD_FLOOR


def target_verdict(variant: str, time_ratio: float | None, mem_ratio: float | None) -> str:
    """'met' / 'missed' against :data:`TARGETS` (Liger variants use their base variant's target), '' if none."""
    target = TARGETS.get(variant.removesuffix(overhead.LIGER))
    if target is None or time_ratio is None or mem_ratio is None:
        return ""
    return "met" if time_ratio <= target[0] and mem_ratio <= target[1] else "missed"


# ----------------------------------------------------------------------------------------------- (a) numerics
def attention_implementations(device: str) -> list[str]:
    """SDPA first (the share's reference), then every flash implementation transformers can load here."""
    if device != "cuda":
        return ["sdpa", "eager"]  # the CPU has no flash kernels; eager exercises the second-implementation path
    from transformers.utils import import_utils

    found = ["sdpa"]
    for name, check in (("flash_attention_2", "is_flash_attn_2_available"),
                        ("flash_attention_3", "is_flash_attn_3_available")):
        if getattr(import_utils, check, lambda: False)():
            found.append(name)
    return found


def _batch(vocab: int, seq_len: int, batch: int, device: str):
    """Random ids; row b's first (3 + b) / 10 of the tokens are prompt, the rest response."""
    import torch

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
    labels = ids.clone()
    for row in range(batch):
        labels[row, : seq_len * (3 + row) // 10] = -100
    return ids.to(device), labels.to(device)


def _lora_grads(model):
    import torch

    return torch.cat([p.grad.detach().float().flatten() for p in model.parameters()
                      if p.requires_grad and p.grad is not None])


def _full_logits_pass(model, ids, labels, autocast):
    """Per-token NLL of the response, the mean loss and the LoRA gradients, through the model's own logits."""
    import torch
    import torch.nn.functional as F

    model.zero_grad(set_to_none=True)
    with autocast():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    rows, cols = (labels != -100).nonzero(as_tuple=True)
    nll = F.cross_entropy(logits[rows, cols - 1].float(), labels[rows, cols], reduction="none")
    loss = nll.mean()
    loss.backward()
    return nll.detach(), loss.detach(), _lora_grads(model), logits.detach()


def _head_pass(model, ids, labels, autocast):
    """The same through sstoken's head (every response token kept: the loss is comparable)."""
    import torch

    from sstoken.selection.lm_head import HeadRequest

    model.zero_grad(set_to_none=True)
    response = labels != -100
    request = HeadRequest(labels=labels, score_mask=response, select=lambda token_nll: (response, None))
    with autocast():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, sstoken_head=request)
    loss = out.kept_nll_sum / response.sum()
    loss.backward()
    rows, cols = response.nonzero(as_tuple=True)
    return out.token_nll[rows, cols].detach(), loss.detach(), _lora_grads(model)


def _errors(value, reference) -> dict:
    diff = (value.double() - reference.double())
    return {"max_abs": float(diff.abs().max()), "mean_abs": float(diff.abs().mean()),
            "rel_norm": float(diff.norm() / reference.double().norm().clamp(min=1e-30))}


def _keep_mask(history_bt, nll, labels):
    """ssToken's keep set by REL alone (γ=1: no attention) from a per-token NLL of the response."""
    import torch

    from sstoken.selection import scoring

    response = labels != -100
    current = torch.zeros_like(history_bt)
    current[response] = nll.float().to(current.device)
    return scoring.sstoken_mask(history_bt, current, torch.zeros_like(current), response, gamma=1.0, rho=RHO)


def head_numerics(shape: str, attn: str, device: str, seq_len: int, batch: int, quick: bool,
                  sdpa_share=None) -> tuple[dict, object]:
    """One (shape, attention implementation) case of part (a). Returns (record, the probe's share)."""
    import contextlib
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from sstoken.selection import lm_head
    from sstoken.selection.attention import ContextShareProbe

    started = time.time()
    config = common.shape_config(shape, quick, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.bfloat16)
    # A random B as well as A, so that the adapter changes the forward and every LoRA weight gets a gradient.
    model = get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0,
                                             target_modules="all-linear", init_lora_weights=False))
    reference = copy.deepcopy(model).float()
    if attn.startswith("flash"):  # flash kernels take half precision only: the float32 reference uses SDPA
        reference.get_base_model().set_attn_implementation("sdpa")
    ids, labels = _batch(config.vocab_size, seq_len, batch, device)
    response = labels != -100

    def bf16():
        return torch.autocast(device_type=device, dtype=torch.bfloat16)

    ref_nll, ref_loss, ref_grads, _ = _full_logits_pass(reference, ids, labels, contextlib.nullcontext)
    with torch.no_grad(), reference.disable_adapter():
        base_logits = reference(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    rows, cols = response.nonzero(as_tuple=True)
    history = torch.zeros(response.shape, dtype=torch.float32, device=device)
    history[rows, cols] = torch.nn.functional.cross_entropy(base_logits[rows, cols - 1].float(), labels[rows, cols],
                                                            reduction="none")
    del base_logits, reference
    full_nll, full_loss, full_grads, full_logits = _full_logits_pass(model, ids, labels, bf16)
    record = {"shape": shape, "attn_implementation": attn, "seq_len": seq_len, "batch": batch,
              "response_tokens": int(response.sum()), "lora_parameters": int(ref_grads.numel())}
    reason = lm_head.use_sstoken_head(model, "gpu check")
    record["full_logits_reason"] = reason
    ref_keep = _keep_mask(history, ref_nll, labels)
    record["full_logits"] = {"nll": _errors(full_nll, ref_nll), "loss_rel": float(abs(full_loss - ref_loss) / ref_loss),
                             "grad": _errors(full_grads, ref_grads),
                             "keep_agreement": float((_keep_mask(history, full_nll, labels) & ref_keep).sum()
                                                     / ref_keep.sum())}
    if reason is None:
        head_nll, head_loss, head_grads = _head_pass(model, ids, labels, bf16)
        record["head"] = {"nll": _errors(head_nll, ref_nll), "loss_rel": float(abs(head_loss - ref_loss) / ref_loss),
                          "grad": _errors(head_grads, ref_grads),
                          "keep_agreement": float((_keep_mask(history, head_nll, labels) & ref_keep).sum()
                                                  / ref_keep.sum()),
                          "nll_vs_full_max_abs": float((head_nll - full_nll).abs().max())}
        record["head_ok"] = (head_verdict(record["head"]["nll"]["mean_abs"], record["full_logits"]["nll"]["mean_abs"])
                             and head_verdict(record["head"]["grad"]["rel_norm"],
                                              record["full_logits"]["grad"]["rel_norm"]))
    # The attention probe: the forward that captures the share must give the logits of the forward without it, and
    # the share must be SDPA's.
    model.eval()
    probe = ContextShareProbe(model, layer=-1)
    with bf16(), torch.no_grad(), probe.capture(~response, torch.ones_like(ids)) as capture:
        after = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    share = capture.required_share()
    record["probe"] = {"logits_max_abs_change": float((after.float() - full_logits.float()).abs().max()),
                       "share_mean": float(share[response].mean())}
    if sdpa_share is not None:
        record["probe"]["share_vs_sdpa_max_abs"] = float((share - sdpa_share).abs().max())
    record["seconds"] = round(time.time() - started, 1)
    if device == "cuda":
        record["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated())
    return record, share


def run_numerics(device: str, sizes: dict, quick: bool) -> list[dict]:
    import torch

    records = []
    for shape in SHAPES:
        sdpa_share = None
        for attn in attention_implementations(device):
            log(f"numerics {shape} {attn}")
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                record, share = head_numerics(shape, attn, device, sizes["seq_len"], sizes["numerics_batch"], quick,
                                              sdpa_share)
                if attn == "sdpa":
                    sdpa_share = share
            except Exception:  # noqa: BLE001 - a failing case is a finding; the other cases still run
                record = {"shape": shape, "attn_implementation": attn, "error": traceback.format_exc(limit=6)}
                log(record["error"])
            records.append(record)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    return records


# ----------------------------------------------------------------------------------------------- (b), (c) steps
def liger_usable(device: str) -> str | None:
    """Why the Liger variants cannot run here, or None."""
    import importlib.util

    if device != "cuda":
        return "Liger's kernels need a GPU"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed"
    return None


def qlora_usable(device: str) -> str | None:
    import importlib.util

    return None if importlib.util.find_spec("bitsandbytes") else "bitsandbytes is not installed"


def overhead_args(device: str, sizes: dict, quick: bool, model_dir: str | None, variants: list[str], out: Path,
                  extra: list[str]) -> list[str]:
    args = ["--device", device, "--seq-lens", str(sizes["seq_len"]), "--batch-size", str(sizes["batch"]),
            "--repeats", str(sizes["repeats"]), "--warmup", str(sizes["warmup"]), "--parts", "steps",
            "--shape", STEP_SHAPE, "--variants", *variants, "--out", str(out), "--no-markdown", *extra]
    if quick:
        args.append("--quick")
    if model_dir:
        args += ["--model", model_dir]
    return args


def run_overhead(args: list[str]) -> dict:
    parser = argparse.ArgumentParser()
    overhead.add_arguments(parser)
    opts = parser.parse_args(args)
    result = overhead.run(opts)
    return {"command": result["metadata"]["command"], "settings": result["metadata"]["settings"],
            "records": result["records"]}


def run_steps(device: str, sizes: dict, quick: bool, model_dir: str | None, workdir: Path) -> dict:
    why_no_liger = liger_usable(device)
    variants = ["trl", "trl-liger", "plain", "sstoken-cached", "sstoken-cached-liger", "sstoken-online", "sstoken-ema"]
    if why_no_liger:
        variants = [v for v in variants if not v.endswith(overhead.LIGER)]
    part = run_overhead(overhead_args(device, sizes, quick, model_dir, variants, workdir / "steps.json",
                                      ["--dtype", "bfloat16"]))
    part["liger_skipped"] = why_no_liger
    for record in part["records"]:  # Liger variants are judged against TRL with Liger
        against = "liger_" if record["variant"].endswith(overhead.LIGER) else ""
        record["verdict"] = target_verdict(record["variant"], record.get(f"{against}time_ratio"),
                                           record.get(f"{against}mem_ratio"))
    return part


def run_qlora(device: str, sizes: dict, quick: bool, model_dir: str | None, workdir: Path) -> dict:
    why_not = qlora_usable(device)
    if why_not:
        return {"skipped": why_not, "records": []}
    return run_overhead(overhead_args(device, sizes, quick, model_dir, ["trl", "sstoken-online"],
                                      workdir / "qlora.json", ["--load-in-4bit", "--dtype", "bfloat16"]))


# ----------------------------------------------------------------------------------------------- (d) report
def _fmt(value, digits=3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and (value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4)):
        return f"{value:.2e}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(result: dict) -> str:
    meta = result["metadata"]
    lines = [f"### GPU check: {meta['gpu']}", "",
             f"Command: `{meta['command']}`  ",
             f"Date: {meta['date']}; torch {meta['versions'].get('torch')}, transformers "
             f"{meta['versions'].get('transformers')}, trl {meta['versions'].get('trl')}, peft "
             f"{meta['versions'].get('peft')}, liger-kernel {meta['versions'].get('liger-kernel') or 'not installed'}, "
             f"bitsandbytes {meta['versions'].get('bitsandbytes') or 'not installed'}; wall time "
             f"{meta.get('wall_s', 0) / 60:.1f} min" + (" (**dry run on the CPU: numbers mean nothing**)"
                                                        if meta["dry_run"] else "") + "."]
    numerics = result.get("numerics")
    if numerics is not None:
        lines += ["", "**(a) Numerics**: bf16 weights under bf16 autocast, LoRA r16 on every linear layer, one batch "
                  "of random ids; errors against the same model in float32 (full logits). Per-token NLL: mean "
                  "absolute error; gradient: relative error of all LoRA gradients; keep: share of float32's ssToken "
                  "keep set (REL, ρ 0.6) kept. Head ok = the head's NLL and gradient errors are at most "
                  f"{HEAD_SLACK}× the full logits' (+{HEAD_FLOOR}). Probe: largest logit change with the attention "
                  "probe installed, and its share against SDPA's.", "",
                  "| shape | attention | tokens | NLL err head / full | loss rel err head / full "
                  "| grad rel err head / full | keep head / full | head ok | probe Δlogit | share Δ vs SDPA |",
                  "|---|---|---:|---|---|---|---|---|---:|---:|"]
        for r in numerics:
            if "error" in r:
                lines.append(f"| {r['shape']} | {r['attn_implementation']} | – | failed: "
                             f"{r['error'].strip().splitlines()[-1][:120]} | | | | no | | |")
                continue
            head, full = r.get("head"), r["full_logits"]
            pair = (lambda h, f: f"{_fmt(h)} / {_fmt(f)}")
            lines.append(
                f"| {r['shape']} | {r['attn_implementation']} | {r['response_tokens']} | "
                + (f"{pair(head['nll']['mean_abs'], full['nll']['mean_abs'])} | "
                   f"{pair(head['loss_rel'], full['loss_rel'])} | "
                   f"{pair(head['grad']['rel_norm'], full['grad']['rel_norm'])} | "
                   f"{pair(head['keep_agreement'], full['keep_agreement'])} | {'yes' if r['head_ok'] else 'no'} | "
                   if head else f"full logits only: {r['full_logits_reason']} | | | | – | ")
                + f"{_fmt(r['probe']['logits_max_abs_change'])} | "
                f"{_fmt(r['probe'].get('share_vs_sdpa_max_abs'))} |")
    for key, title in (("steps", "(b) Step time and peak memory"), ("qlora", "(c) QLoRA (4-bit)")):
        part = result.get(key)
        if part is None:
            continue
        records = part.get("records") or []
        if part.get("skipped") or "command" not in part:
            lines += ["", f"**{title}**: " + (f"skipped ({part['skipped']})" if part.get("skipped") else "not run")]
        else:
            measured = (f"{records[0]['time_metric']} time, peak memory by {records[0]['memory_method']}"
                        if records else "")
            lines += ["", f"**{title}**: `{part['command']}`; {part['settings']['model']}, LoRA r16 all-linear, "
                      f"batch {part['settings']['batch_size']}, medians of {part['settings']['repeats']} steps after "
                      f"{part['settings']['warmup']} warm-up; {measured}. Losses: the first steps' (finite: "
                      "the step trained)."]
        if part.get("liger_skipped"):
            lines.append(f"Liger variants not run: {part['liger_skipped']}.")
        if part.get("error"):
            lines.append(f"Failed: {part['error'].strip().splitlines()[-1][:200]}")
        if not records:
            continue
        lines += ["", "| seq | variant | step s | × TRL | peak MiB | mem × TRL | × TRL+Liger (time, mem) | losses "
                  "| target (time, mem) | verdict |", "|---:|---|---:|---:|---:|---:|---|---|---|---|"]
        for r in records:
            target = TARGETS.get(r["variant"].removesuffix(overhead.LIGER))
            liger = (f"{_fmt(r['liger_time_ratio'])}, {_fmt(r['liger_mem_ratio'])}"
                     if "liger_time_ratio" in r else "")
            losses = ", ".join(f"{x:.3f}" for x in r.get("losses", [])[:3])
            step_s = r["step_cpu_s"] if r.get("time_metric") == "cpu" else r["step_s"]
            lines.append(f"| {r['seq_len']} | {r['variant']} | {step_s:.3f} | {_fmt(r['time_ratio'])} | "
                         f"{r['peak_mem_bytes'] / 2**20:,.0f} | {_fmt(r['mem_ratio'])} | {liger} | {losses} | "
                         + (f"≤ {target[0]}, ≤ {target[1]}" if target and key == "steps" else "") + f" | "
                         f"{r.get('verdict', '')} |")
    return "\n".join(lines) + "\n"


def versions() -> dict:
    import importlib.metadata

    found = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "liger-kernel", "bitsandbytes",
                 "triton", "flash-attn"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def write(result: dict, out: Path) -> None:
    common.write_json(out / "gpu-check.json", result)
    (out / "gpu-check.md").write_text(markdown(result), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu/check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu-check.json and gpu-check.md")
    parser.add_argument("--model", help="folder with the tokenizer the step rows are built with (default: the "
                        "embedded SmolLM2's; check.sh passes its prepared copy)")
    parser.add_argument("--dry-run", action="store_true", help="the CPU at test sizes: checks the script runs")
    parser.add_argument("--parts", nargs="+", choices=("numerics", "steps", "qlora"),
                        default=["numerics", "steps", "qlora"])
    parser.add_argument("--budget-s", type=float, default=330,
                        help="a part that would start after this many seconds is skipped (default 330)")
    opts = parser.parse_args(argv)
    started = time.time()
    import torch

    device = "cpu" if opts.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: torch sees no CUDA device (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    sizes = DRY_SIZES if opts.dry_run else GPU_SIZES
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/gpu/check.py" + (" --dry-run" if opts.dry_run else "")
    result: dict = {"metadata": {
        "benchmark": "gpu-check", "command": command, "date": common.now_utc(), "dry_run": opts.dry_run,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "none (dry run on the CPU)",
        "machine": common.machine_info(device), "versions": versions(), "sizes": sizes,
        "targets": {k: list(v) for k, v in TARGETS.items()}}}
    write(result, out)
    parts = {"numerics": lambda workdir: run_numerics(device, sizes, opts.dry_run),
             "steps": lambda workdir: run_steps(device, sizes, opts.dry_run, opts.model, workdir),
             "qlora": lambda workdir: run_qlora(device, sizes, opts.dry_run, opts.model, workdir)}
    failed = False
    with tempfile.TemporaryDirectory(prefix="sstoken-gpu-check-") as tmp:
        for name in opts.parts:
            elapsed = time.time() - started
            if elapsed > opts.budget_s:
                result[name] = {"skipped": f"time budget ({elapsed:.0f} s > {opts.budget_s:.0f} s)", "records": []}
                log(f"{name}: skipped, {result[name]['skipped']}")
                continue
            log(f"{name}: start")
            try:
                result[name] = parts[name](Path(tmp))
            except Exception:  # noqa: BLE001 - record the failure, keep the other parts
                failed = True
                result[name] = {"error": traceback.format_exc(limit=8), "records": []}
                log(result[name]["error"])
            result["metadata"]["wall_s"] = round(time.time() - started, 1)
            write(result, out)
            log(f"{name}: done ({time.time() - started:.0f} s)")
    print(markdown(result))
    numerics = result.get("numerics") or []
    failed = failed or any("error" in r for r in numerics if isinstance(r, dict))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
