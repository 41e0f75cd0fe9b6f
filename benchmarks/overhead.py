"""``python benchmarks/overhead.py``: what token selection costs per training step, side by side with stock TRL.

Run from the repository root (the benchmarks are not part of the installed package); results go to
``benchmarks/results/`` and the ``## Overhead`` section of ``BENCHMARKS.md``.

For each sequence length, one batch of demo samples concatenated to that length (real prompt/response
structure, no padding) is trained on by six variants, each in its own worker process holding its own copy of
the model with a LoRA adapter:

* ``trl``: stock ``trl.SFTTrainer`` with its defaults (its fused LM head, which also computes the entropy and
  top-1 accuracy it logs), what a user would run instead; every ratio is taken against it;
* ``trl-liger`` (GPU only, not run by default): stock TRL with ``use_liger_kernel`` (Liger's layer kernels);
* ``plain``: sstoken's own loss path with every response token kept (``SSTokenTrainer``, selection ``full``);
* ``sstoken-cached``: ssToken, base-model NLL read from an ``sstoken cache`` store;
* ``sstoken-cached-liger`` (GPU only, not run by default): the same with ``use_liger_kernel``, compared with
  ``trl-liger`` as well;
* ``sstoken-online``: ssToken, base-model NLL from a no-grad pass with the adapter disabled, in the same step;
* ``sstoken-ema``: ssToken, history NLL from a no-grad pass with the EMA adapter;
* ``reference-style``: the official release's approach, rebuilt for comparison only: eager attention with
  ``output_attentions=True`` (every layer's B×H×T×T map), the last layer's map averaged over heads and summed
  over prompt columns, full-vocabulary per-token NLL, and an online base-model pass.

All variants share one loop (``Trainer.training_step`` = forward + backward, then the optimizer step; the
EMA update where there is one), so a difference in time or memory is the cost of the loss path and of
selection, and nothing else. After a warm-up the parent asks the workers for one step each in turn
(A B C D E, B C D E A, ...), so drift in machine load hits every variant alike; medians are reported.

Peak memory: per worker, the RSS high-water mark reset after set-up (CPU) or ``torch.cuda.max_memory_allocated``
after a reset (GPU). The same command also measures the attention share's own memory against eager attention
maps (``benchmarks/attention_memory.py``) and ``sstoken cache`` throughput against a plain no-grad forward
(``benchmarks/cache_throughput.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import common

from sstoken.demo import DEMO_DATA

VARIANTS = ("trl", "trl-liger", "plain", "sstoken-cached", "sstoken-cached-liger", "sstoken-online", "sstoken-ema",
            "reference-style")
BASELINE = "trl"
LIGER = "-liger"  # variants with Liger's kernels (they need a GPU); also compared with TRL + Liger
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if not v.endswith(LIGER))
DEFAULT_SEQ_LENS = (512, 1024, 2048)
QUICK_SEQ_LENS = (64,)
# The demo recipe's adapter (src/sstoken/demo/demo.yaml).
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
RHO, GAMMA = 0.6, 0.5
STEP_TIMEOUT_S = 3600  # a step that takes longer than this means the worker is stuck
REPO_ROOT = Path(__file__).resolve().parent.parent  # default outputs go here, whatever the working directory


# ----------------------------------------------------------------------------------------------- the batch
def bench_rows(tokenizer, data_path: str, seq_len: int, batch_size: int) -> list[dict]:
    """``batch_size`` rows of exactly ``seq_len`` tokens: consecutive demo samples concatenated, then cut.

    Concatenating real samples keeps the demo's mix of prompt (context) and response tokens at every length,
    and fills the row, so that a length-T row costs a length-T step (padding would not). Row b starts at a
    different sample so the rows of a batch differ.
    """
    from sstoken.data.sources import load_training_rows

    # Samples are read whole (a generous limit) and cut only after concatenation.
    samples, _ = load_training_rows(data_path, tokenizer, max_seq_length=max(seq_len, 4096))
    rows = []
    for b in range(batch_size):
        ids: list[int] = []
        labels: list[int] = []
        index = (b * 17) % len(samples)
        while len(ids) < seq_len:
            sample = samples[index % len(samples)]
            ids += sample["input_ids"]
            labels += sample["labels"]
            index += 1
        rows.append({"input_ids": ids[:seq_len], "labels": labels[:seq_len]})
    return rows


def _collate(rows: list[dict], device: str) -> dict:
    import torch

    ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long, device=device)
    return {
        "input_ids": ids,
        "labels": torch.tensor([r["labels"] for r in rows], dtype=torch.long, device=device),
        # TRL's collator passes a mask; all ones here (no padding) so SDPA can still take its causal fast path.
        "attention_mask": torch.ones_like(ids),
    }


# ----------------------------------------------------------------------------------------------- trainers
def _reference_style_trainer_class():
    """The official release's approach, built on SSTokenTrainer so that the loop around the loss is identical."""
    import torch
    import torch.nn.functional as F

    from sstoken.selection import scoring
    from sstoken.selection.history import base_weights
    from sstoken.selection.signals import BatchLayout, model_inputs_of
    from sstoken.training.trainer import SSTokenTrainer

    def kept_cross_entropy(logits, labels, keep):
        rows, cols = keep.nonzero(as_tuple=True)
        loss_sum = F.cross_entropy(logits[rows, cols - 1].float(), labels[rows, cols], reduction="sum")
        return loss_sum / keep.sum().clamp(min=1)

    def full_vocab_nll(logits, labels):
        # The straightforward per-token loss: log-softmax of every position over the whole vocabulary at once.
        batch, length, vocab = logits.shape
        flat = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1),
                               ignore_index=scoring.IGNORE_INDEX, reduction="none")
        out = torch.zeros(batch, length, device=logits.device)
        out[:, 1:] = flat.view(batch, length - 1)
        return out

    class ReferenceStyleTrainer(SSTokenTrainer):
        """The official release's recipe (for comparison only): every layer's eager attention map is returned."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs["labels"]
            layout = BatchLayout.of(inputs)
            model_inputs = model_inputs_of(inputs)
            outputs = model(**model_inputs, output_attentions=True)
            context = layout.context.float()
            last = outputs.attentions[-1].detach().float().mean(dim=1)  # B×T×T, mean over heads
            share = (last * context[:, None, :]).sum(-1)  # attention mass on prompt columns
            current = full_vocab_nll(outputs.logits.detach(), labels)
            with torch.no_grad(), base_weights(model):
                history = full_vocab_nll(model(**model_inputs).logits, labels)
            keep = scoring.sstoken_mask(history, current, share, layout.response, gamma=GAMMA, rho=RHO)
            return kept_cross_entropy(outputs.logits, labels, keep)

    return ReferenceStyleTrainer


def _build_trainer(spec: dict, rows: list[dict], part_timer=None):
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from sstoken.data.encoding import to_hf_dataset
    from sstoken.models import load_tokenizer
    from sstoken.training.config import SSTokenConfig
    from sstoken.training.trainer import SSTokenTrainer

    variant = spec["variant"]
    liger = variant.endswith(LIGER)
    variant = variant.removesuffix(LIGER)
    tokenizer = load_tokenizer(spec["model_dir"])
    model = common.load_bench_model(spec["model_dir"], spec.get("random_init", False),
                                    attn_implementation="eager" if variant == "reference-style" else "sdpa",
                                    dtype=spec.get("dtype"), quantization=spec.get("quantization"),
                                    device=spec["device"])
    common_args = dict(
        output_dir=str(Path(spec["workdir"]) / f"out-{spec['variant']}"),
        use_cpu=spec["device"] == "cpu",
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        max_length=spec["seq_len"],
        per_device_train_batch_size=spec["batch_size"],
        learning_rate=1e-4,
        seed=spec["seed"],
        activation_checkpointing=spec["activation_checkpointing"],
        # Both trainers in the same precision (SFTConfig alone would ask for bf16 even where there is none).
        bf16=spec.get("bf16", False) or (spec["device"] == "cuda" and torch.cuda.is_bf16_supported()),
        use_liger_kernel=liger,
    )
    if variant == BASELINE:
        config, cls = SFTConfig(**common_args), SFTTrainer
    else:
        config = SSTokenConfig(
            **common_args,
            # reference-style computes its own loss; "full" keeps SSTokenTrainer from hooking attention.
            selection_method="full" if variant in ("plain", "reference-style") else "sstoken",
            rho=RHO,
            gamma=GAMMA,
            history="ema" if variant == "sstoken-ema" else "base",
            history_cache=spec.get("cache_dir") if variant == "sstoken-cached" else None,
        )
        cls = _reference_style_trainer_class() if variant == "reference-style" else SSTokenTrainer
    torch.manual_seed(spec["seed"])  # the same LoRA initialisation in every worker
    lora = LORA
    extra = {} if part_timer is None else {"part_timer": part_timer}
    trainer = cls(model=model, args=config, train_dataset=to_hf_dataset(rows), processing_class=tokenizer,
                  peft_config=LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                         target_modules=lora["target_modules"], task_type="CAUSAL_LM"), **extra)
    if liger:  # what Trainer.train() does at its start (the loop here calls training_step directly)
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(trainer.model, trainer.args.liger_kernel_config)
    if config.activation_checkpointing:
        # Trainer.train() switches checkpointing on at its start; this loop calls training_step directly.
        kwargs = dict(config.activation_checkpointing_kwargs or {})
        kwargs.pop("every_n_layers", None)
        kwargs.pop("offload", None)
        inner = trainer.model
        enable = getattr(inner, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs or None)
        else:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)
    if config.bf16:
        # Trainer.train() has accelerate wrap the forward in autocast (accelerator.prepare); the loop here does not
        # call train(), so the model is prepared the same way (in place: one process, no wrapper).
        assert trainer.accelerator.prepare_model(trainer.model) is trainer.model
    trainer.create_optimizer()
    # Trainer.train() sets this before each step (SSTokenTrainer's loss ignores it); the loop here does not.
    trainer.current_gradient_accumulation_steps = 1
    if spec.get("log_every_step") and variant != BASELINE:
        # Stock TRL computes entropy and token accuracy on every step; sstoken only on steps that log. Logging every
        # step makes every timed step pay for them, as TRL's does.
        trainer.state.logging_steps = 1
    return trainer


class _PartTimer:
    """CPU seconds spent, inside a step, in each piece of work that selection adds to plain SFT.

    The end-to-end comparison with ``trl`` subtracts two long steps measured at different moments on a shared
    machine; these parts are timed within the very step they belong to, so their share of that step is a
    paired measurement that load drift cannot move. CPU only: on a GPU the work is asynchronous and timing
    a part would need synchronisations the real step does not have.

    Passed to the trainer as ``part_timer`` (SSTokenTrainer's hook): the trainer wraps each part in
    ``timer(name)``. The current model's NLL is not a part: sstoken's head computes it inside the training
    forward, as TRL's fused head computes stock TRL's loss.
    """

    def __init__(self):
        self.parts: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.process_time()
        try:
            yield
        finally:
            self.parts[name] = self.parts.get(name, 0.0) + time.process_time() - start

    def take(self) -> dict[str, float]:
        parts, self.parts = self.parts, {}
        return parts


def _one_step(trainer, batch: dict, device: str) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of this process, loss) of one optimizer step."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    loss = trainer.training_step(trainer.model, dict(batch))
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.state.global_step += 1
    ema = getattr(trainer, "ema", None)  # stock SFTTrainer has none
    if ema is not None:  # what _EMACallback.on_step_end does in Trainer.train()
        with trainer.timed_part("ema_update"):
            ema.update(trainer.state.global_step)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - start_cpu, float(loss)


# ----------------------------------------------------------------------------------------------- workers
def _worker_main(conn, spec: dict) -> None:
    """One variant at one length: set up, then run a step whenever the parent says so."""
    try:
        import torch

        torch.set_num_threads(spec["threads"])
        from sstoken.models import load_tokenizer

        tokenizer = load_tokenizer(spec["model_dir"])
        rows = bench_rows(tokenizer, spec["data"], spec["seq_len"], spec["batch_size"])
        timer = _PartTimer()
        timed = spec["device"] != "cuda" and spec["variant"].startswith("sstoken-")
        trainer = _build_trainer(spec, rows, part_timer=timer if timed else None)
        batch = _collate(rows, "cuda" if spec["device"] == "cuda" else "cpu")
        from sstoken.selection import scoring

        response = int(scoring.response_mask_from_labels(batch["labels"]).sum())
        conn.send(("ready", {"response_tokens": response, "tokens": int(batch["input_ids"].numel())}))
        while True:
            command = conn.recv()
            if command == "step":
                timer.take()
                wall, cpu, loss = _one_step(trainer, batch, spec["device"])
                conn.send(("step", (wall, cpu, loss, timer.take())))
            elif command == "memory":
                # The first step of the worker, untimed: it doubles as the warm-up (lazy initialisation, optimizer
                # state) and runs with malloc in its memory-measuring mode (see common.malloc_follows_live_memory).
                memory = common.PeakMemory(spec["device"])
                memory.start()
                _one_step(trainer, batch, spec["device"])
                peak = memory.peak()
                conn.send(("memory", {"peak_mem_bytes": peak, "baseline_mem_bytes": memory.baseline,
                                      "memory_method": memory.method}))
            elif command == "finish":
                return
    except BaseException:  # report any failure to the parent instead of dying silently
        conn.send(("error", traceback.format_exc()))


def _cache_builder_main(conn, spec: dict) -> None:
    """Build the base-model NLL cache for one length in a throw-away process (untimed set-up)."""
    try:
        import torch

        torch.set_num_threads(spec["threads"])
        from sstoken.models import load_tokenizer
        from sstoken.selection.nll_cache import build_nll_cache

        tokenizer = load_tokenizer(spec["model_dir"])
        rows = bench_rows(tokenizer, spec["data"], spec["seq_len"], spec["batch_size"])
        # The trained model's weights, dtype and quantization: the cache's model fingerprint must match them.
        model = common.load_bench_model(spec["model_dir"], spec.get("random_init", False), dtype=spec.get("dtype"),
                                        quantization=spec.get("quantization"), device=spec["device"])
        if not spec.get("quantization"):  # a quantized model is already on its device
            model = model.to("cuda" if spec["device"] == "cuda" else "cpu")
        build_nll_cache(model, tokenizer, rows, spec["cache_dir"], spec["seq_len"], batch_size=spec["batch_size"],
                        progress=False)
        conn.send(("done", None))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


class _Worker:
    def __init__(self, target, spec: dict):
        ctx = common.worker_context()
        self.conn, child = ctx.Pipe()
        self.name = spec.get("variant", "cache")
        self.process = ctx.Process(target=target, args=(child, spec), daemon=True)
        self.process.start()
        child.close()

    def _receive(self, expected: str, timeout: float = STEP_TIMEOUT_S):
        if not self.conn.poll(timeout):
            self.process.kill()
            raise RuntimeError(f"bench worker {self.name} did not answer within {timeout:.0f}s")
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"bench worker {self.name} died (exit code {self.process.exitcode})") from None
        if kind == "error":
            raise RuntimeError(f"bench worker {self.name} failed:\n{payload}")
        assert kind == expected, (kind, expected)
        return payload

    def ready(self):
        return self._receive("ready")

    def step(self) -> float:
        self.conn.send("step")
        return self._receive("step")

    def memory(self) -> dict:
        self.conn.send("memory")
        return self._receive("memory")

    def finish(self) -> None:
        self.conn.send("finish")
        self.process.join(60)

    def wait_done(self):
        result = self._receive("done")
        self.process.join(60)
        return result

    def kill(self):
        if self.process.is_alive():
            self.process.kill()
            self.process.join(10)


# ----------------------------------------------------------------------------------------------- orchestration
def run_steps(opts, model_dir: str, workdir: Path) -> list[dict]:
    records = []
    for seq_len in opts.seq_lens:
        spec = {
            "seq_len": seq_len,
            "batch_size": opts.batch_size,
            "model_dir": model_dir,
            "data": opts.data,
            "device": opts.device,
            "threads": opts.threads,
            "seed": 0,
            "workdir": str(workdir),
            "activation_checkpointing": opts.activation_checkpointing,
            "random_init": opts.random_init,
            "log_every_step": opts.log_every_step,
            "bf16": opts.bf16,
            "cache_dir": str(workdir / f"cache-{seq_len}"),
            "dtype": opts.dtype,
            "quantization": _quantization(opts),
        }
        if any(v.removesuffix(LIGER) == "sstoken-cached" for v in opts.variants):
            builder = _Worker(_cache_builder_main, dict(spec))
            try:
                builder.wait_done()
            finally:
                builder.kill()
        workers: dict[str, _Worker] = {}
        try:
            info = {}
            for variant in opts.variants:  # one at a time: loading in parallel would only contend for the CPU
                workers[variant] = _Worker(_worker_main, dict(spec, variant=variant))
                info[variant] = workers[variant].ready()
            memory = {}
            for variant in opts.variants:
                memory[variant] = workers[variant].memory()
            _log(f"seq {seq_len} peak memory (MiB): " + ", ".join(
                f"{v} {memory[v]['peak_mem_bytes'] / 2**20:.0f}" for v in opts.variants))
            times: dict[str, list[float]] = {v: [] for v in opts.variants}
            cpu_times: dict[str, list[float]] = {v: [] for v in opts.variants}
            parts: dict[str, list[dict]] = {v: [] for v in opts.variants}
            losses: dict[str, list[float]] = {v: [] for v in opts.variants}  # every step after the first
            n = len(opts.variants)
            for round_index in range(opts.warmup + opts.repeats):
                shift = (round_index + 1) % n  # the memory step ran in the unshifted order
                order = opts.variants[shift:] + opts.variants[:shift]
                for variant in order:
                    wall, cpu, loss, step_parts = workers[variant].step()
                    losses[variant].append(loss)
                    if round_index >= opts.warmup:
                        times[variant].append(wall)
                        cpu_times[variant].append(cpu)
                        parts[variant].append(step_parts)
                _log(f"seq {seq_len} round {round_index + 1}/{opts.warmup + opts.repeats} (wall/cpu s): " + ", ".join(
                    f"{v} {times[v][-1]:.2f}/{cpu_times[v][-1]:.2f}" for v in opts.variants if times[v]))
            for worker in workers.values():
                worker.finish()
        finally:
            for worker in workers.values():
                worker.kill()
        for variant in opts.variants:
            records.append({
                "variant": variant,
                "seq_len": seq_len,
                "batch_size": opts.batch_size,
                "step_s": statistics.median(times[variant]),
                "step_s_all": [round(t, 4) for t in times[variant]],
                "step_cpu_s": statistics.median(cpu_times[variant]),
                "step_cpu_s_all": [round(t, 4) for t in cpu_times[variant]],
                "losses": [round(x, 6) for x in losses[variant]],
                **_selection_share(cpu_times[variant], parts[variant]),
                "peak_mem_bytes": memory[variant]["peak_mem_bytes"],
                "baseline_mem_bytes": memory[variant]["baseline_mem_bytes"],
                "memory_method": memory[variant]["memory_method"],
                "response_tokens": info[variant]["response_tokens"],
                "tokens": info[variant]["tokens"],
            })
    # On a shared CPU, other processes' load stretches wall time by whatever share of the cores they take at
    # that moment; the worker's own CPU time (one thread, so no spin-waiting in it) is what the step costs.
    _add_ratios(records, "wall" if opts.device == "cuda" else "cpu")
    return records


def _selection_share(cpu_times: list[float], parts: list[dict]) -> dict:
    """Per-step CPU seconds of the selection work (medians), and the time ratio those seconds imply.

    ``attributed_time_ratio`` = step / (step - selection), median over steps: the step's cost relative to the
    same step without the selection work, measured inside one step (see _PartTimer).
    """
    if not parts or not any(parts):
        return {}
    names = sorted({name for step in parts for name in step})
    totals = [sum(step.values()) for step in parts]
    return {
        "selection_cpu_s": round(statistics.median(totals), 4),
        "selection_parts_cpu_s": {name: round(statistics.median(step.get(name, 0.0) for step in parts), 4)
                                  for name in names},
        "attributed_time_ratio": round(statistics.median(c / max(1e-9, c - t) for c, t in zip(cpu_times, totals)), 4),
    }


def _add_ratios(records: list[dict], time_metric: str) -> None:
    """Ratios to stock TRL at the same length; ``time_ratio`` uses ``time_metric`` ("cpu" or "wall")."""
    baseline = {r["seq_len"]: r for r in records if r["variant"] == BASELINE}
    key = "step_cpu_s" if time_metric == "cpu" else "step_s"
    for record in records:
        base = baseline.get(record["seq_len"])
        record["time_metric"] = time_metric
        if base is None:
            record["time_ratio"] = record["mem_ratio"] = None
            continue
        record["time_ratio"] = round(record[key] / base[key], 4)
        record["wall_time_ratio"] = round(record["step_s"] / base["step_s"], 4)
        record["cpu_time_ratio"] = round(record["step_cpu_s"] / base["step_cpu_s"], 4)
        record["mem_ratio"] = round(record["peak_mem_bytes"] / base["peak_mem_bytes"], 4)
        # Beyond stock TRL's peak, in bytes: the ratio alone hides how much of the peak is the model itself.
        record["extra_mem_bytes"] = record["peak_mem_bytes"] - base["peak_mem_bytes"]
    liger_baseline = {r["seq_len"]: r for r in records if r["variant"] == BASELINE + LIGER}
    for record in records:  # Liger variants against stock TRL with Liger, too
        base = liger_baseline.get(record["seq_len"])
        if base is not None and record["variant"].endswith(LIGER):
            record["liger_time_ratio"] = round(record[key] / base[key], 4)
            record["liger_mem_ratio"] = round(record["peak_mem_bytes"] / base["peak_mem_bytes"], 4)


def _quantization(opts) -> dict | None:
    """sstoken's QLoRA settings for --load-in-4bit (nf4, bfloat16 compute: TRL ModelConfig's defaults)."""
    if not opts.load_in_4bit:
        return None
    from sstoken.models import QUANTIZATION_DEFAULTS

    return {**QUANTIZATION_DEFAULTS, "load_in_4bit": True}


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------------------------- reporting
TARGETS = {  # against stock TRL, CPU, seq 1024 and 2048: (time ratio, memory ratio)
    "sstoken-cached": (1.03, 1.02),
    "sstoken-online": (1.35, 1.05),
    "sstoken-ema": (1.40, 1.08),
}


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def markdown(result: dict) -> str:
    meta = result["metadata"]
    machine = meta["machine"]
    where = machine.get("gpu") or f"{machine['cpu_model']}, {machine['cpu_count']} cores"
    lines = [
        f"### {meta['device'].upper()}: {where}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}; torch {machine['torch']}, transformers {machine['transformers']}; "
        f"wall time {meta['wall_s'] / 60:.1f} min.  ",
        f"Load average (1/5/15 min) before: {meta['load_average_before']}, after: {meta['load_average_after']} "
        f"(the machine is shared; the A/B rotation spreads that load over all variants).  ",
        f"Model: {meta['settings']['model']}, LoRA r={LORA['r']} all-linear, batch {meta['settings']['batch_size']}, "
        f"activation checkpointing {'on' if meta['settings']['activation_checkpointing'] else 'off'}; "
        f"per variant and length: one untimed first step that measures peak memory "
        f"({result['records'][0]['memory_method'] if result['records'] else '-'}, one worker process per variant), "
        f"{meta['settings']['warmup']} more warm-up step(s), then {meta['settings']['repeats']} timed steps in "
        f"rotation with the other variants.",
        "",
        f"Time ratio = median {'wall-clock' if meta['device'] == 'cuda' else 'CPU'} time of a step over stock "
        f"TRL's (`trl.SFTTrainer` with its defaults)"
        + ("" if meta["device"] == "cuda" else " (CPU seconds of the worker process: other agents' load on the "
           "shared machine stretches wall time, not the work a step does; wall-clock ratios are in the JSON)")
        + ".",
        "",
        "In-step = the selection work's CPU seconds timed inside the same steps (history NLL, "
        "attention share, top-ρ selection, logging, EMA update) and the ratio step / (step − selection) they imply: "
        "a paired measurement that machine load cannot shift (CPU runs only).",
        "",
        "| seq | variant | step s wall | step s CPU | time × trl | in-step selection s | in-step × | peak MiB "
        "| mem × trl | extra MiB | target (time, mem) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["records"]:
        target = TARGETS.get(r["variant"])
        verdict = ""
        if target and r["seq_len"] in (1024, 2048) and r["time_ratio"] is not None:
            ok = r["time_ratio"] <= target[0] and r["mem_ratio"] <= target[1]
            verdict = f"≤{target[0]}, ≤{target[1]}: {'met' if ok else 'missed'}"
        lines.append(
            f"| {r['seq_len']} | {r['variant']} | {r['step_s']:.2f} | {r['step_cpu_s']:.2f} | {r['time_ratio']:.3f} | "
            + (f"{r['selection_cpu_s']:.2f} | {r['attributed_time_ratio']:.3f} | " if "selection_cpu_s" in r else "– | – | ")
            + f"{_mib(r['peak_mem_bytes'])} | {r['mem_ratio']:.3f} | {_mib(r.get('extra_mem_bytes', 0))} | {verdict} |"
        )
    attention = result.get("attention_memory")
    if attention:
        lines += ["", "Attention share vs eager attention maps, one layer alone (B=1, "
                  f"{attention['heads']} query / {attention['kv_heads']} KV heads, head dim {attention['head_dim']}, "
                  f"share chunk {attention['chunk_size']}): extra memory above the inputs.", "",
                  "| tokens | share MiB | eager map MiB | eager / share |", "|---:|---:|---:|---:|"]
        for row in attention["rows"]:
            ratio = row["eager_extra_bytes"] / max(1, row["share_extra_bytes"])
            lines.append(f"| {row['seq_len']} | {_mib(row['share_extra_bytes'])} | {_mib(row['eager_extra_bytes'])} | "
                         f"{ratio:.1f} |")
    cache = result.get("cache_throughput")
    if cache:
        lines += ["", f"`sstoken cache` over {cache['rows']} demo rows ({cache['tokens']} tokens, batch "
                  f"{cache['batch_size']}, length-bucketed): {cache['cache_s']:.2f} s vs plain no-grad forward "
                  f"over the same batches {cache['forward_s']:.2f} s (medians of {cache['repeats']}), "
                  f"throughput ratio **{cache['throughput_ratio']:.3f}** (target ≥ 0.95); of the build, "
                  f"{cache.get('fixed_s', 0):.2f} s is what a one-sample build costs beyond its forward (fingerprints, "
                  f"index and shard files, checksums), paid once per cache; without it the ratio is {cache.get('steady_throughput_ratio', float('nan')):.3f}."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- entry point
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seq-lens", type=int, nargs="+", help="sequence lengths (default 512 1024 2048)")
    parser.add_argument("--batch-size", type=int, default=1, help="rows per step (default 1)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed steps per variant and length (default 1, which keeps the default run near 25 "
                             "minutes on a 2-core CPU; use 3 or more where time allows)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="untimed steps per variant after the first one (default 0: the first step of every "
                             "worker is already untimed; it measures the peak memory and warms up)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS),
                        help=f"variants to run (default: all but the Liger ones, which need a GPU); '{BASELINE}' "
                             f"(stock TRL) is needed for the ratios")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", help="model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--random-init", action="store_true",
                        help="random weights in the model's architecture (same step cost; for machines the "
                             "weights cannot be copied to)")
    parser.add_argument("--shape", choices=sorted(common.MODEL_SHAPES),
                        help="random-init model of that architecture and shapes (e.g. gemma-3-270m: vocab 262144, "
                             "hidden 640, 18 layers, where the LM head dominates memory) with the --model's tokenizer "
                             "(with --quick: the same architecture at test size)")
    parser.add_argument("--large-vocab", action="store_true",
                        help="the same as --shape gemma-3-270m (the name in earlier recorded commands)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="dtype of the model's weights (default: the checkpoint's; float32 for random weights)")
    parser.add_argument("--load-in-4bit", action="store_true",
                        help="QLoRA: the model quantized to 4 bits (nf4) as it loads, through sstoken's loader "
                             "(random weights are saved to a checkpoint first); needs bitsandbytes")
    parser.add_argument("--data", default=None, help="JSONL data the rows are built from (default: the demo data)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default 1 on CPU: on a shared machine several threads "
                             "spin-wait for each other and make both wall and CPU time erratic; all cores on GPU)")
    parser.add_argument("--log-every-step", action="store_true",
                        help="sstoken variants compute TRL's entropy / token accuracy on every timed step, as stock "
                             "TRL does (by default they are computed only on logging steps)")
    parser.add_argument("--bf16", action="store_true",
                        help="every variant in bf16 mixed precision (autocast, the weights staying float32), on a CPU "
                             "too (on a GPU with bf16 support it is on anyway)")
    parser.add_argument("--no-activation-checkpointing", dest="activation_checkpointing", action="store_false",
                        help="train without activation checkpointing (SSTokenConfig's default is on)")
    parser.add_argument("--parts", nargs="+", choices=("steps", "attention", "cache"),
                        default=["steps", "attention", "cache"], help="which measurements to run (default all)")
    parser.add_argument("--attention-lens", type=int, nargs="+", help="lengths for the attention-memory part "
                        "(default 2048 4096 8192)")
    parser.add_argument("--cache-rows", type=int, default=None, help="demo rows for the cache-throughput part")
    parser.add_argument("--quick", action="store_true",
                        help="tiny random model and lengths: checks the benchmark runs (seconds), numbers mean nothing")
    parser.add_argument("--out", help="JSON file (default <repo>/benchmarks/results/overhead-<device>[-quick].json)")
    parser.add_argument("--markdown", help="Markdown file whose '## Overhead' section gets the table "
                        "(default <repo>/BENCHMARKS.md for a full run, none with --quick)")
    parser.add_argument("--no-markdown", action="store_true", help="do not write any Markdown")


def command_of(opts) -> str:
    """The ``python benchmarks/overhead.py`` command line that reproduces ``opts`` (options left at default omitted).

    Rebuilt from the parsed options rather than ``sys.argv``, which is the caller's (pytest, a script) when the
    benchmark is run through :func:`run`.
    """
    import shlex

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    words = ["python", "benchmarks/overhead.py"]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(opts, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[0]
        if action.nargs == 0:  # store_true / store_false
            words.append(flag)
        elif isinstance(value, (list, tuple)):
            words += [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    return " ".join(shlex.quote(w) for w in words)


def _shape_of(opts) -> str | None:
    return opts.shape or ("gemma-3-270m" if opts.large_vocab else None)


def _model_description(opts) -> str:
    details = "".join([f", {opts.dtype} weights" if opts.dtype else "",
                       ", quantized to 4 bits (nf4)" if opts.load_in_4bit else ""])
    shape = _shape_of(opts)
    if shape:
        model_type, architecture, real, tiny = common.MODEL_SHAPES[shape]
        shapes = tiny if opts.quick else real
        return (f"{architecture}, {'test-size ' + model_type if opts.quick else shape} shapes (vocab "
                f"{shapes['vocab_size']}, hidden {shapes['hidden_size']}, {shapes['num_hidden_layers']} layers), "
                f"random weights{details}, tokenizer of "
                + ("the tiny test model" if opts.quick else opts.model or "SmolLM2-135M-Instruct"))
    if opts.quick:
        return "tiny random llama (sstoken.testing)" + details
    random = opts.random_init or getattr(opts, "saved_random_weights", False)
    return (opts.model or "SmolLM2-135M-Instruct (embedded)") + (", random weights" if random else "") + details


def run(opts) -> dict:
    started = time.time()
    command = command_of(opts)  # before the defaults below are filled in
    if opts.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            from sstoken.errors import ConfigError

            raise ConfigError("--device cuda but torch sees no CUDA device")
    opts.seq_lens = list(opts.seq_lens or (QUICK_SEQ_LENS if opts.quick else DEFAULT_SEQ_LENS))
    opts.threads = opts.threads or (os.cpu_count() or 1 if opts.device == "cuda" else 1)
    opts.variants = [v for v in VARIANTS if v in opts.variants]  # fixed order for the rotation and the table
    if opts.quick:
        opts.repeats = min(opts.repeats, 1)
        opts.warmup = 0
    load_before = common.load_average()
    result: dict = {"records": []}
    with tempfile.TemporaryDirectory(prefix="sstoken-bench-") as tmp:
        workdir = Path(tmp)
        model_dir = common.hf_checkpoint(opts.model, workdir, opts.quick)
        if _shape_of(opts):
            model_dir = common.shaped_checkpoint(_shape_of(opts), model_dir, workdir, opts.quick)
            opts.random_init = True
        if opts.load_in_4bit and opts.random_init:
            # bitsandbytes quantizes the weights as they load: random weights are saved to a checkpoint first.
            model_dir = common.random_weights_checkpoint(model_dir, workdir, opts.dtype)
            opts.random_init, opts.saved_random_weights = False, True
        if not opts.data:
            if opts.quick:  # short rows in the tiny tokenizer's vocabulary, so tiny lengths still hold responses
                from sstoken.testing import write_tiny_jsonl

                opts.data = write_tiny_jsonl(workdir / "tiny.jsonl", n_rows=32)
            else:
                opts.data = str(DEMO_DATA)
        if "steps" in opts.parts:
            result["records"] = run_steps(opts, model_dir, workdir)
        if "attention" in opts.parts:
            import attention_memory

            lens = opts.attention_lens or ((128,) if opts.quick else (2048, 4096, 8192))
            result["attention_memory"] = attention_memory.run(lens, opts.device)
        if "cache" in opts.parts:
            import cache_throughput

            result["cache_throughput"] = cache_throughput.run(
                model_dir, opts.data, opts.device, opts.threads, workdir, random_init=opts.random_init,
                # All 300 demo rows take a second on a GPU; 24 keep the CPU run near its time budget.
                rows=opts.cache_rows or (8 if opts.quick else 300 if opts.device == "cuda" else 24),
                max_seq_length=64 if opts.quick else 512, repeats=2)
    result["metadata"] = {
        "benchmark": "overhead",
        "command": command,
        "date": common.now_utc(),
        "device": opts.device,
        "machine": common.machine_info(opts.device),
        "load_average_before": load_before,
        "load_average_after": common.load_average(),
        "wall_s": round(time.time() - started, 1),
        "quick": bool(opts.quick),
        "settings": {
            "model": _model_description(opts),
            "data": "tiny generated rows (sstoken.testing)" if opts.quick and opts.data.endswith("tiny.jsonl")
            else ("demo.jsonl (sstoken/demo)" if opts.data == str(DEMO_DATA) else opts.data),
            "seq_lens": opts.seq_lens,
            "batch_size": opts.batch_size,
            "repeats": opts.repeats,
            "warmup": opts.warmup,
            "variants": opts.variants,
            "lora": LORA,
            "rho": RHO,
            "gamma": GAMMA,
            "activation_checkpointing": opts.activation_checkpointing,
            "threads_per_worker": opts.threads,
            "parts": opts.parts,
            "log_every_step": opts.log_every_step,
            "bf16": opts.bf16,
            "dtype": opts.dtype,
            "load_in_4bit": opts.load_in_4bit,
        },
    }
    # Keep the schema keys first in the file for readers.
    result = {"metadata": result.pop("metadata"), **result}
    suffix = "-quick" if opts.quick else ""
    out = opts.out or str(REPO_ROOT / "benchmarks" / "results" / f"overhead-{opts.device}{suffix}.json")
    common.write_json(out, result)
    _log(f"wrote {out}")
    default_md = None if opts.quick else str(REPO_ROOT / "BENCHMARKS.md")
    md_path = None if opts.no_markdown else (opts.markdown or default_md)
    if md_path:
        common.replace_marked_block(md_path, "Overhead", f"overhead-{opts.device}", markdown(result))
        _log(f"updated {md_path} (## Overhead)")
    print(markdown(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/overhead.py", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    ns = parser.parse_args(argv)
    run(ns)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
