"""Train a tiny model through sstoken's signal pipeline and LM head with sharded weights, and record everything.

Run by ``tests/training/test_sharded.py`` under ``torch.distributed.run --standalone --nproc_per_node 2`` (gloo,
CPU; ``DS_ACCELERATOR=cpu`` for DeepSpeed). The Hugging Face Trainer runs neither FSDP nor DeepSpeed on a CPU
(accelerate then sets up plain multi-CPU DDP), so the engines are applied here by hand, the way accelerate applies
them: FSDP2 ``fully_shard`` on every decoder layer and then on the root module (``TRANSFORMER_BASED_WRAP``),
ZeRO-3 through ``deepspeed.initialize`` on a model loaded under ``HfDeepSpeedConfig`` (``zero.Init``: partitioned
from the start). Each step runs what ``SSTokenTrainer.compute_loss`` runs: :func:`select_tokens` (history NLL,
forward with the attention share, selection inside sstoken's head, kept-token loss), then the backward and an SGD
step. Rank r at step k trains on micro-batch ``2k + r``; the test runs the same micro-batches in one process,
unsharded, accumulating two per step (:func:`run_reference`), and compares.

Each case writes ``<workdir>/<case>-rank<r>.pt``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ddp_train  # noqa: E402  (the rows both helpers train on)

WORLD = 2
STEPS = 3
BATCH = 2
LR = 0.05
DENOMINATOR = 16.0  # a fixed loss scale: the engines average gradients over ranks, the reference over micro-batches
SKIPPED = (1, 1)  # (step, rank) of the micro-batch whose loss is NaN in the *_skip cases

FSDP_CASES = ("fsdp_full", "fsdp_tied", "fsdp_lora", "fsdp_skip", "fsdp_head_unit")
ZERO3_CASES = ("zero3_full", "zero3_tied", "zero3_lora", "zero3_skip")
ZERO2_CASES = ("zero2_ema",)
CASES = FSDP_CASES + ("fsdp_meta",) + ZERO3_CASES + ZERO2_CASES


def case_settings(case: str) -> dict:
    """What a case trains: tied head or not, LoRA or full fine-tuning, which selector and history."""
    tied = case.endswith("_tied")
    lora = case.endswith("_lora")
    if lora:
        method, history = "sstoken", "base"  # online base history: a no-grad pass with the adapter off
    elif tied:
        method, history = "attn", None  # no history: the attention share alone
    elif case.endswith("_ema"):
        method, history = "sstoken", "ema"
    else:
        method, history = "sstoken", "cache"  # the base model's NLL cache, checked against the model's fingerprint
    return {"tied": tied, "lora": lora, "method": method, "history": history, "skip": case.endswith("_skip")}


def micro_batch(step: int, rank: int) -> dict:
    """Micro-batch ``2·step + rank`` of the rows, padded."""
    from sstoken.batch import pad_rows
    from sstoken.testing import tiny_tokenizer

    rows = ddp_train.make_rows()
    index = WORLD * step + rank
    ids, labels, mask = pad_rows(rows[BATCH * index:BATCH * (index + 1)], tiny_tokenizer().pad_token_id)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def build_model(tied: bool, lora: bool, path: str | None = None, seed: int = 0):
    from sstoken.testing import tiny_model

    if path is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path)
    else:
        model = tiny_model(seed=seed, tie_word_embeddings=tied)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)  # LoRA's A matrices are drawn from the global generator
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM", init_lora_weights=False))
    return model


def poison_hook(model, state: dict):
    """NaN in the final norm's output while ``state["poison"]``."""
    ddp_train.poison_final_norm(model, lambda: state["poison"])


def sources_for(settings: dict, model, workdir: str):
    from sstoken.batch import unwrap_model
    from sstoken.selection.attention import ContextShareProbe
    from sstoken.selection.selectors import make_selector
    from sstoken.selection.signals import BaseModelHistory, CachedHistory, EMAModelHistory, SignalSources

    selector = make_selector(settings["method"], rho=0.5, gamma=0.5)
    history, ema = None, None
    if settings["history"] == "base":
        history = BaseModelHistory()
    elif settings["history"] == "cache":
        from sstoken.selection.nll_cache import NLLCache

        history = CachedHistory(NLLCache.open(os.path.join(workdir, "cache")))
    elif settings["history"] == "ema":
        from sstoken.selection.history import EMAHistory

        ema = EMAHistory(model, decay=0.5)
        history = EMAModelHistory(ema)
    probe = ContextShareProbe(unwrap_model(model)) if selector.needs_attention else None
    return selector, SignalSources(history=history, probe=probe, sstoken_head=True), ema


def train_step(model, selector, sources, step: int, rank: int, backward, scale: float, state: dict) -> dict:
    """One micro-batch through the trainer's pipeline; the NaN micro-batch is skipped the trainer's way."""
    from sstoken.selection.signals import select_tokens
    from sstoken.training.guards import drop_gradients

    state["poison"] = state["skip"] and (step, rank) == SKIPPED
    selection = select_tokens(model, micro_batch(step, rank), selector, sources, draw_key=step * WORLD + rank)
    loss = selection.outputs.kept_nll_sum / DENOMINATOR * scale
    dropped = None
    finite = bool(torch.isfinite(loss))
    if not finite:
        dropped = drop_gradients(loss, model)
        loss = loss.nan_to_num(0.0, 0.0, 0.0)
    backward(loss)
    if dropped is not None:
        dropped.remove()
    return {"loss": float(loss.detach()), "finite": finite, "keep": selection.keep.cpu(),
            "nll": selection.current_nll.detach().cpu()}


def run_reference(case: str, workdir: str) -> dict:
    """The same micro-batches in one process, unsharded: two accumulated per step."""
    from sstoken.selection import lm_head

    settings = case_settings(case)
    model = build_model(settings["tied"], settings["lora"])
    if lm_head.use_sstoken_head(model, "test") is not None:
        raise AssertionError("the reference must run sstoken's head")
    state = {"skip": settings["skip"], "poison": False}
    poison_hook(model, state)
    selector, sources, ema = sources_for(settings, model, workdir)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    records = []
    model.train()
    for step in range(STEPS):
        for rank in range(WORLD):
            records.append(train_step(model, selector, sources, step, rank, lambda loss: loss.backward(),
                                      1.0 / WORLD, state))
        optimizer.step()
        optimizer.zero_grad()
        if ema is not None:
            ema.update(step + 1)
    return {"records": records, "weights": trainable(model),
            "ema": None if ema is None else {n: t.clone() for n, t in ema.shadow.items()}}


def trainable(model) -> dict:
    from sstoken import distributed

    weights = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            with distributed.materialized(param) as full:
                weights[name] = full.detach().cpu().clone()
    return weights


# ----------------------------------------------------------------------------------------------- FSDP2
def shard_fsdp2(model, head_unit: bool = False):
    """accelerate's TRANSFORMER_BASED_WRAP: each decoder layer a unit, then the root; ``head_unit``: the LM head a
    unit of its own too (a size-based policy would make it one: it is the largest module)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from sstoken.batch import unwrap_base_model

    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in unwrap_base_model(model).model.layers:
        fully_shard(layer, mesh=mesh)
    if head_unit:
        fully_shard(unwrap_base_model(model).get_output_embeddings(), mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def sgd_steps(model, optimizer, selector, sources, state: dict) -> list[dict]:
    """This rank's micro-batch of every step, one SGD update after each: the sharded runs' training loop."""
    import torch.distributed as dist

    records = []
    model.train()
    for step in range(STEPS):
        records.append(train_step(model, selector, sources, step, dist.get_rank(), lambda loss: loss.backward(),
                                  1.0, state))
        optimizer.step()
        optimizer.zero_grad()
    return records


def run_fsdp(case: str, workdir: str) -> dict:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from sstoken.selection import lm_head
    from sstoken.selection.nll_cache import model_fingerprint

    settings = case_settings(case)
    model = shard_fsdp2(build_model(settings["tied"], settings["lora"]), head_unit=case.endswith("_head_unit"))
    sharded = all(isinstance(p, DTensor) for p in model.parameters())
    state = {"skip": settings["skip"], "poison": False}
    poison_hook(model, state)
    selector, sources, _ = sources_for(settings, model, workdir)
    # Built on the sharded parameters, as accelerate builds it, before anything runs the model (a forward without
    # backward leaves the root module's parameters unsharded until the next backward).
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    result = {"rank": dist.get_rank(), "sharded": sharded, "fingerprint": model_fingerprint(model),
              "head_reason": lm_head.use_sstoken_head(model, "test")}
    result.update(records=sgd_steps(model, optimizer, selector, sources, state), weights=trainable(model))
    return result


def run_fsdp_meta(workdir: str) -> dict:
    """accelerate's FSDP2 with ``cpu_ram_efficient_loading``: only rank 0 keeps the checkpoint's weights, the other
    ranks' model is moved to the meta device, and after sharding rank 0's weights are broadcast into every shard
    (``fsdp2_prepare_model``). With meta weights on rank 1 every rank must still agree (fingerprint, head or full
    logits); once the weights are in, the head runs and trains like one process."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from sstoken.selection import lm_head
    from sstoken.selection.nll_cache import model_fingerprint

    def rank0_only():
        model = build_model(tied=False, lora=False, path=os.path.join(workdir, "tiny-model"))
        return model if dist.get_rank() == 0 else model.to("meta")

    model = rank0_only()
    result = {"rank": dist.get_rank(), "meta": any(p.is_meta for p in model.parameters()),
              "fingerprint": model_fingerprint(model), "reason_before_loading": lm_head.full_logits_reason(model)}
    model = rank0_only()
    full_state = model.state_dict() if dist.get_rank() == 0 else {}
    buffers = {name: buffer.clone() for name, buffer in build_model(False, False).named_buffers()}
    model.to("meta")
    shard_fsdp2(model)
    model.to_empty(device="cpu")
    for name, buffer in model.named_buffers():  # rotary inv_freq and the like: not in the state dict
        buffer.copy_(buffers[name])
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    result["reason_after_loading"] = lm_head.use_sstoken_head(model, "test")
    selector, sources, _ = sources_for(case_settings("fsdp_full"), model, workdir)
    state = {"skip": False, "poison": False}
    result.update(records=sgd_steps(model, optimizer, selector, sources, state), weights=trainable(model))
    return result


# ----------------------------------------------------------------------------------------------- DeepSpeed
def deepspeed_config(stage: int) -> dict:
    return {
        # Every parameter partitioned, however small (the default keeps parameters under 100k elements whole).
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed's default clips at 1.0
        "zero_allow_untested_optimizer": True,  # torch's SGD
    }


def run_deepspeed(case: str, workdir: str) -> dict:
    import deepspeed
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    from sstoken import distributed
    from sstoken.selection import lm_head
    from sstoken.selection.nll_cache import model_fingerprint

    settings = case_settings(case)
    stage = 3 if case.startswith("zero3") else 2
    config = deepspeed_config(stage)
    keep_alive = HfDeepSpeedConfig(config) if stage == 3 else None  # from_pretrained then loads into zero.Init
    path = os.path.join(workdir, "tiny-model-tied" if settings["tied"] else "tiny-model")
    result = {"rank": dist.get_rank()}
    if stage == 3 and not settings["lora"] and not settings["tied"]:
        # Two models of the same architecture, different weights: partitioned, their fingerprints must differ.
        other = build_model(False, False, path=os.path.join(workdir, "tiny-model-seed1"))
        result["fingerprint_other"] = model_fingerprint(other)
        del other
    model = build_model(settings["tied"], settings["lora"], path=path)
    head_weight = model.get_output_embeddings().weight
    result["partitioned"] = distributed.is_zero3_partitioned(head_weight) and head_weight.numel() == 0
    result["fingerprint"] = model_fingerprint(model)
    state = {"skip": settings["skip"], "poison": False}
    poison_hook(model, state)
    selector, sources, ema = sources_for(settings, model, workdir)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    result["head_reason"] = lm_head.use_sstoken_head(engine, "test")

    def backward(loss):
        engine.backward(loss)
        engine.step()

    records = []
    engine.train()
    for step in range(STEPS):
        records.append(train_step(engine, selector, sources, step, dist.get_rank(), backward, 1.0, state))
        if ema is not None:
            ema.update(step + 1)
    result.update(records=records, weights=trainable(engine.module))
    if ema is not None:
        result["ema"] = {n: t.clone() for n, t in ema.shadow.items()}
    del keep_alive
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--cases", default=",".join(CASES))
    ns = parser.parse_args(argv)
    torch.set_num_threads(1)
    import torch.distributed as dist

    # A collective that never completes (a rank out of step) fails the run instead of hanging it.
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
    for case in ns.cases.split(","):
        if case == "fsdp_meta":
            result = run_fsdp_meta(ns.workdir)
        elif case.startswith("fsdp"):
            result = run_fsdp(case, ns.workdir)
        else:
            result = run_deepspeed(case, ns.workdir)
        torch.save(result, os.path.join(ns.workdir, f"{case}-rank{result['rank']}.pt"))
        dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
