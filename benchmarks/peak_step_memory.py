"""Peak RSS of one training step of one variant, in this process (before/after sstoken's own LM head).

    PYTHONPATH=<sstoken tree>/src OMP_NUM_THREADS=1 nice -n 10 \
        python benchmarks/peak_step_memory.py --variant sstoken-online --model-dir <dir> --seq-len 1024

``--model-dir`` holds a config and a tokenizer; the weights are random (``common.load_bench_model`` with
``random_init``), e.g. the gemma-3-270m-shaped directory of ``common.shaped_checkpoint``. The step is the
overhead benchmark's (``Trainer.training_step`` + optimizer step, LoRA r=16 all-linear, activation checkpointing
on, batch 1, one thread) on demo rows concatenated to ``--seq-len``. Only APIs present before the change are
used, so the same file measures the tree before it (e.g. ``git archive f5cfd2d src``) and after.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("trl", "sstoken-cached", "sstoken-online")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--seq-len", type=int, default=1024)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    import sstoken
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common
    import overhead

    from sstoken.data.encoding import to_hf_dataset
    from sstoken.demo import DEMO_DATA
    from sstoken.models import load_tokenizer
    from sstoken.selection.nll_cache import build_nll_cache
    from sstoken.training.config import SSTokenConfig
    from sstoken.training.trainer import SSTokenTrainer

    tokenizer = load_tokenizer(args.model_dir)
    rows = overhead.bench_rows(tokenizer, str(DEMO_DATA), args.seq_len, 1)
    model = common.load_bench_model(args.model_dir, random_init=True)
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = str(Path(tmp) / "cache")
        if args.variant == "sstoken-cached":
            build_nll_cache(model, tokenizer, rows, cache_dir, args.seq_len, batch_size=1, progress=False)
        common_args = dict(output_dir=str(Path(tmp) / "out"), use_cpu=True, report_to=[], save_strategy="no",
                           disable_tqdm=True, max_length=args.seq_len, per_device_train_batch_size=1,
                           learning_rate=1e-4, seed=0, activation_checkpointing=True, bf16=False)
        if args.variant == "trl":
            config, cls = SFTConfig(**common_args), SFTTrainer
        else:
            config, cls = SSTokenConfig(**common_args, selection_method="sstoken", rho=overhead.RHO,
                                        gamma=overhead.GAMMA, history="base",
                                        history_cache=cache_dir if args.variant == "sstoken-cached" else None), \
                SSTokenTrainer
        lora = overhead.LORA
        torch.manual_seed(0)
        trainer = cls(model=model, args=config, train_dataset=to_hf_dataset(rows), processing_class=tokenizer,
                      peft_config=LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                             target_modules=lora["target_modules"], task_type="CAUSAL_LM"))
        # Trainer.train() switches checkpointing on at its start; the step here is run directly (as in the bench).
        enable = getattr(trainer.model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable()
        else:
            trainer.model.gradient_checkpointing_enable()
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1
        batch = overhead._collate(rows, "cpu")
        memory = common.PeakMemory("cpu")
        memory.start()
        start = time.process_time()
        trainer.training_step(trainer.model, dict(batch))
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        cpu_s = time.process_time() - start
        peak = memory.peak()
    print(json.dumps({"variant": args.variant, "sstoken": str(Path(sstoken.__file__).parent), "seq_len": args.seq_len,
                      "peak_mem_bytes": peak, "baseline_mem_bytes": memory.baseline,
                      "peak_mib": round(peak / 2**20), "step_cpu_s": round(cpu_s, 1),
                      "memory_method": memory.method}), flush=True)


if __name__ == "__main__":
    main()
