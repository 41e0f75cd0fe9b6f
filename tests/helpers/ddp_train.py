"""Train a tiny model for a few steps with ssToken selection and record what every micro-batch did.

Run by ``tests/training/test_distributed.py`` in two ways that must agree:

* under ``accelerate launch --num_processes 2 --cpu`` (gloo DDP), ``--grad-accum 1``: each rank writes
  ``<workdir>/<case>-rank<r>.pt``;
* in the pytest process itself, one process, ``grad_accum=2`` (the reference).

Why gradient accumulation and not a doubled batch for the reference: accelerate shards the *batches* of one
sampler (``BatchSamplerShard``, ``even_batches``), so DDP rank r at step k gets batch ``2k + r`` of the
same seeded sampler that one process walks through, and one process accumulating 2 micro-batches gets
batches ``2k`` and ``2k + 1`` at step k: the very same tensors, padding included. A doubled batch would pad the
two halves to one common length, which changes the floating-point sums of the forward pass. The test
checks this order equivalence from the recorded sample keys instead of assuming it.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

CASES = ("base", "cached", "ema", "weighted")  # weighted: cached, with the data's and DFT's token weights
# The "skip" case is "base" with one micro-batch whose loss is NaN: global micro-batch SKIPPED (rank 1 of step 1
# under DDP, the 4th micro-batch of the one-process reference).
SKIPPED = 3
N_ROWS = 16
BATCH = 2  # per device / per micro-batch
STEPS = 3
CLI_STEPS = 2


def make_rows(n_rows: int = N_ROWS, seed: int = 1) -> list[dict]:
    """Random token rows with very different response lengths, so two ranks keep different token counts."""
    from sstoken.testing import tiny_tokenizer

    vocab = len(tiny_tokenizer())
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n_rows):
        prompt = int(torch.randint(3, 10, (1,), generator=g))
        # Alternate short and long answers: kept counts (ceil(rho*n)) then differ a lot between batches.
        response = int(torch.randint(2, 5, (1,), generator=g)) if i % 3 else int(torch.randint(12, 20, (1,), generator=g))
        ids = torch.randint(3, vocab, (prompt + response,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def with_weights(rows: list[dict], seed: int = 2) -> list[dict]:
    """The rows with token weights that vary along each row: in [2, 3) for the long answers (every third row, see
    make_rows), in [0.25, 1) for the others, so that a mean of the ranks' means is far from the step's mean; every
    fourth row is stored without (1s)."""
    from sstoken.batch import TOKEN_WEIGHTS

    g = torch.Generator().manual_seed(seed)
    out = []
    for i, row in enumerate(rows):
        low = 2.0 if i % 3 == 0 else 0.25
        weights = (low + (1.0 if i % 3 == 0 else 0.75) * torch.rand(len(row["input_ids"]), generator=g)).tolist()
        out.append({**row, TOKEN_WEIGHTS: [] if i % 4 == 3 else weights})
    return out


def build_cache(workdir: str) -> str:
    """Base-model NLL cache of the training rows (what `sstoken cache` writes)."""
    from sstoken.selection.nll_cache import build_nll_cache
    from sstoken.testing import tiny_model, tiny_tokenizer

    path = os.path.join(workdir, "cache")
    build_nll_cache(tiny_model(seed=0), tiny_tokenizer(), make_rows(), path, max_seq_length=64, batch_size=4,
                    progress=False)
    return path


def _recording_trainer_class():
    from sstoken.selection.nll_cache import iter_samples, sample_key
    from sstoken.selection.signals import BatchLayout
    from sstoken.training.trainer import SSTokenTrainer

    class RecordingTrainer(SSTokenTrainer):
        """Records, per micro-batch: step, sample keys, keep mask, kept (weighted) NLL sum, kept count, loss,
        denominator."""

        records: list

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            seen = {}

            def record(event):
                seen["keep"], seen["nll"] = event.keep.detach().cpu(), event.signals.current_nll.detach().cpu()
                seen["weights"] = None if event.weights is None else event.weights.detach().cpu()

            self.add_selection_listener(record)
            try:
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                self.selection_listeners.remove(record)
            layout = BatchLayout.of(inputs)
            keys = [sample_key(tokens) for _, _, tokens in iter_samples(inputs["input_ids"], layout.valid,
                                                                          layout.segment_ids)]
            keep = seen["keep"]
            self.records.append({
                "step": self.state.global_step,
                "keys": keys,
                "keep": keep,
                "kept": int(keep.sum()),
                # Σ wᵢ·NLLᵢ over the kept tokens: the numerator of the loss (weights 1 unless the case weighs)
                "kept_nll_sum": float((seen["nll"] * keep * (1.0 if seen["weights"] is None else seen["weights"])).sum()),
                "loss": float((loss[0] if return_outputs else loss).detach()),
                "denominator": int(num_items_in_batch) if num_items_in_batch is not None else None,
            })
            return loss

    return RecordingTrainer


def run_case(case: str, workdir: str, grad_accum: int, use_cpu: bool = True) -> dict:
    """Train case ``case`` for STEPS optimizer steps; returns this process's records and final weights."""
    from datasets import Dataset
    from peft import LoraConfig

    from sstoken.testing import tiny_model, tiny_tokenizer
    from sstoken.training.config import SSTokenConfig

    lora = case in ("base", "skip")
    args = SSTokenConfig(
        output_dir=os.path.join(workdir, f"out-{case}-ga{grad_accum}"),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=grad_accum,
        max_steps=STEPS,
        # Plain SGD, large steps: Adam is invariant to the scale of the gradient, so a wrongly scaled loss (a
        # missing or extra division by ranks or accumulation steps) would go unnoticed in the weights; with SGD
        # it shows. Large steps make the selections after step 1 depend on the updated weights.
        optim="sgd",
        # DFT weighs each token by its probability, about 1/vocabulary on a random model: a step 100 times larger
        # moves the weights as much as in the other cases.
        learning_rate=50.0 if case == "weighted" else 0.5,
        lr_scheduler_type="constant",
        activation_checkpointing=False,  # tiny model: recomputing activations only costs time
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=use_cpu,
        disable_tqdm=True,
        dataloader_num_workers=0,
        max_length=None,
        selection_method="sstoken",
        rho=0.5,
        gamma=0.5,
        history="ema" if case == "ema" else "base",
        ema_decay=0.5,
        history_cache=os.path.join(workdir, "cache") if case in ("cached", "weighted") else None,
        loss_type="dft" if case == "weighted" else "nll",
    )
    torch.manual_seed(0)  # LoRA initialisation draws from the global generator
    trainer = _recording_trainer_class()(
        model=tiny_model(seed=0),
        args=args,
        train_dataset=Dataset.from_list(with_weights(make_rows()) if case == "weighted" else make_rows()),
        processing_class=tiny_tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                               task_type="CAUSAL_LM") if lora else None,
    )
    trainer.records = []
    if case == "skip":
        _poison_one_micro_batch(trainer)
    trainer.train()
    weights = {name: p.detach().cpu().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    result = {"records": trainer.records, "weights": weights,
              "world_size": trainer.args.world_size, "rank": trainer.args.process_index,
              "distributed_type": str(trainer.accelerator.distributed_type),
              "wrapper": type(trainer.model_wrapped).__name__, "skipped": trainer.skipped_nonfinite_steps}
    if trainer.ema is not None:
        result["ema_shadow"] = {name: t.detach().cpu().clone() for name, t in trainer.ema.shadow.items()}
        result["ema_updates"] = trainer.ema.updates
        # The same shadow gathered over ranks inside the job, through accelerate (rank 0 sees every rank's).
        flat = torch.cat([t.reshape(-1) for t in trainer.ema.shadow.values()])
        result["ema_gathered"] = trainer.accelerator.gather(flat.unsqueeze(0)).cpu()
    return result


def poison_final_norm(model, when) -> None:
    """Make the final norm's output NaN in a training forward (the history pass and the head check run in eval mode)
    whenever ``when()``, asked once per training forward, says so. The NaN stays in the autograd graph (a product,
    not a new tensor), as a real overflow would: the backward still runs through every layer, which is what keeps
    the rank in step with the others."""
    from sstoken.batch import unwrap_base_model

    def poison(module, args, output):
        return output * float("nan") if module.training and when() else output

    unwrap_base_model(model).model.norm.register_forward_hook(poison)


def _poison_one_micro_batch(trainer) -> None:
    """NaN in the training forward of global micro-batch SKIPPED."""
    world, rank = trainer.args.world_size, trainer.args.process_index
    forwards = {"count": 0}

    def is_skipped() -> bool:
        micro_batch = forwards["count"] * world + rank
        forwards["count"] += 1
        return micro_batch == SKIPPED

    poison_final_norm(trainer.model, is_skipped)


def write_cli_recipe(workdir: str) -> str:
    """A recipe for `sstoken train` on a saved tiny model (run by the "cli" case under the same launch)."""
    import yaml

    from sstoken.testing import save_tiny_model, write_tiny_jsonl

    recipe = {
        "model": save_tiny_model(os.path.join(workdir, "tiny-model")),
        "data": write_tiny_jsonl(os.path.join(workdir, "tiny.jsonl"), n_rows=16),
        "max_seq_length": 128,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        "plots": False,
        "output_dir": os.path.join(workdir, "out-cli"),
        "max_steps": CLI_STEPS,
        "per_device_train_batch_size": BATCH,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,  # without it, a machine with no GPU runs N independent, non-distributed trainings
        "activation_checkpointing": False,
        "disable_tqdm": True,
    }
    path = os.path.join(workdir, "recipe.yaml")
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(recipe, handle)
    return path


def run_cli(workdir: str) -> dict:
    """`sstoken train --config recipe.yaml` inside this (launched) process, as `accelerate launch -m sstoken.cli` does."""
    from accelerate import PartialState

    from sstoken.cli import main as cli_main

    rc = cli_main(["train", "--config", os.path.join(workdir, "recipe.yaml")])
    state = PartialState()
    return {"rc": rc, "rank": state.process_index, "num_processes": state.num_processes}


def run_fsdp_ema(workdir: str) -> dict:
    """EMA history on a model sharded by FSDP2 (``fully_shard``, what accelerate's FSDP plugin applies), on CPU.

    HF Trainer never enables FSDP on CPU (``use_cpu`` means plain multi-CPU DDP), so this shards the model by hand
    on the process group the launch already set up. As in the trainer, the EMA is built before the model is
    sharded; fully_shard then replaces every parameter, and an EMA still holding the old ones would silently
    stop updating and run its history forward on the live weights. The EMA must refuse instead. The sharded
    training itself is checked against an unsharded replica (every rank trains on the same batch, so FSDP's
    averaged gradient is that batch's gradient), which shows FSDP2 really runs here.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from sstoken.errors import ConfigError
    from sstoken.selection.history import EMAHistory, history_forward_nll
    from sstoken.testing import tiny_model

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    sharded, reference = tiny_model(seed=0), tiny_model(seed=0)
    ema = EMAHistory(sharded, decay=0.5)
    for layer in sharded.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(7))
    errors = {}
    for model in (sharded, reference):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
    for name, use in (("forward", lambda: history_forward_nll(sharded, {"input_ids": ids, "use_cache": False}, ids,
                                                              ema=ema)),
                      ("update", lambda: ema.update(1))):
        try:
            use()
            errors[name] = None
        except ConfigError as exc:
            errors[name] = str(exc)
    live = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
            for name, p in sharded.named_parameters()}
    return {
        "rank": dist.get_rank(),
        "sharded": all(isinstance(p, DTensor) for p in sharded.parameters()),
        "errors": errors,
        "live": live,
        "reference_live": {n: p.detach().cpu() for n, p in reference.named_parameters()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--grad-accum", type=int, default=1)
    # Without use_cpu the accelerate config decides (FSDP / DeepSpeed are ignored when use_cpu is set).
    parser.add_argument("--no-use-cpu", dest="use_cpu", action="store_false")
    ns = parser.parse_args(argv)
    for case in ns.cases.split(","):
        if case == "cli":
            result = run_cli(ns.workdir)
        elif case == "fsdp_ema":
            result = run_fsdp_ema(ns.workdir)
        else:
            result = run_case(case, ns.workdir, ns.grad_accum, ns.use_cpu)
        torch.save(result, os.path.join(ns.workdir, f"{case}-rank{result['rank']}.pt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
