"""Per-token NLL through TRL's fused LM head (issue 12): same numbers as the full logits, without building them."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

from sstoken import lm_head, scoring
from sstoken.history import NLLCache, build_nll_cache
from sstoken.testing import tiny_model, tiny_tokenizer
from sstoken.trainer import SSTokenConfig, SSTokenTrainer

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)


# ----------------------------------------------------------------------------------------------- pure maths
def test_shifted_log_probs_become_nll_aligned_to_the_predicted_token():
    log_probs = torch.tensor([[-0.5, -2.0], [0.0, -1.25]])
    assert torch.equal(scoring.nll_from_shifted_log_probs(log_probs),
                       torch.tensor([[0.0, 0.5, 2.0], [0.0, 0.0, 1.25]]))


def test_kept_nll_sum_ignores_dropped_tokens_even_when_not_finite():
    token_nll = torch.tensor([[0.0, 1.0, math.inf, 3.0]], requires_grad=True)
    keep = torch.tensor([[False, True, False, True]])
    total = scoring.kept_nll_sum(token_nll, keep)
    assert total.item() == 4.0
    total.backward()
    assert torch.equal(token_nll.grad, torch.tensor([[0.0, 1.0, 0.0, 1.0]]))


# ----------------------------------------------------------------------------------------------- when to fall back
def test_fused_head_applies_to_a_standard_causal_lm_with_lora():
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert lm_head.full_logits_reason(model) is None


@pytest.mark.parametrize("case, expected", [
    ("label_smoothing", "label smoothing"),
    ("lora_on_lm_head", "PEFT adapter"),
    ("no_lm_head", "no standard LM head"),
])
def test_settings_that_need_full_logits_say_why(case, expected):
    from transformers import AutoModel

    from sstoken.testing import tiny_config

    smoothing = 0.0
    if case == "label_smoothing":
        model, smoothing = tiny_model("llama"), 0.1
    elif case == "lora_on_lm_head":
        model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    else:
        model = AutoModel.from_config(tiny_config("llama"))  # the backbone alone
    assert expected in lm_head.full_logits_reason(model, smoothing)


# ----------------------------------------------------------------------------------------------- the trainer
def make_rows(n=4, seed=0, prompt_len=6, response_len=8):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = torch.randint(3, 300, (prompt_len + i % 3,), generator=gen).tolist()
        response = torch.randint(3, 300, (response_len + i % 4,), generator=gen).tolist()
        rows.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response})
    return rows


def make_trainer(tmp_path, rows, model=None, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=len(rows),
                  report_to="none", save_strategy="no", use_cpu=True, seed=0, gradient_checkpointing=False,
                  dataloader_num_workers=0, selection_method="sstoken", rho=0.5)
    kwargs.update(overrides)
    return SSTokenTrainer(model=model if model is not None else tiny_model("llama"), args=SSTokenConfig(**kwargs),
                          train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer(),
                          peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"]))


def loss_grads_signals(trainer, batch):
    """One training-mode compute_loss + backward; (loss, LoRA grads, signals, keep)."""
    captured = {}
    original = trainer.selector.select

    def spy(signals, progress=0.0):
        captured["signals"], captured["keep"] = signals, original(signals, progress)
        return captured["keep"]

    trainer.selector.select = spy
    try:
        trainer.model.train()
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
    finally:
        trainer.selector.select = original
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.item(), grads, captured["signals"], captured["keep"]


@pytest.mark.parametrize("history", ["base", "ema"])
def test_fused_path_gives_the_full_logits_loss_grads_and_keep_mask(tmp_path, history):
    rows = make_rows()
    trainer = make_trainer(tmp_path, rows, history=history)
    assert trainer.full_logits_reason is None, "the default path is the fused head"
    with torch.no_grad():  # a non-zero adapter, so the current model differs from its history
        gen = torch.Generator().manual_seed(1)
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    fused = loss_grads_signals(trainer, batch)
    trainer.full_logits_reason = "forced by the test"
    full = loss_grads_signals(trainer, batch)

    assert fused[0] == pytest.approx(full[0], rel=1e-5)
    for name in full[1]:
        torch.testing.assert_close(fused[1][name], full[1][name], atol=1e-6, rtol=1e-4)
    response = full[2].response_mask
    torch.testing.assert_close(fused[2].current_nll[response], full[2].current_nll[response], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[2].history_nll[response], full[2].history_nll[response], atol=1e-5, rtol=1e-5)
    assert not torch.equal(full[2].history_nll[response], full[2].current_nll[response])
    assert torch.equal(fused[3], full[3])


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def _refuse_lm_head_calls(model):
    def refuse(module, args, output):
        raise AssertionError(f"lm_head was called on {tuple(args[0].shape)} hidden states: full logits built")

    return model.get_output_embeddings().register_forward_hook(refuse)


def test_default_path_never_builds_batch_by_length_by_vocab_logits(tmp_path):
    # A vocabulary wider than one fused tile (32768 columns), so tiles are visibly smaller than the logits.
    vocab = 70_000
    rows = make_rows(n=2, prompt_len=10, response_len=30)
    model = tiny_model("llama", vocab_size=vocab)
    hook = _refuse_lm_head_calls(model)
    trainer = make_trainer(tmp_path, rows, model=model, history="base")  # online base history pass included
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    batch_size, length = batch["input_ids"].shape
    trainer.model.train()
    with _LargestTensor() as probe:
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
    assert math.isfinite(loss.item())
    assert probe.largest < batch_size * (length - 1) * vocab
    assert probe.largest <= batch_size * (length - 1) * 32768  # one tile of the fused head

    cache_rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
    with _LargestTensor() as probe:
        build_nll_cache(model, tiny_tokenizer(), cache_rows, tmp_path / "cache", max_seq_length=64, progress=False)
    assert probe.largest < batch_size * (length - 1) * vocab
    hook.remove()


def test_cache_through_the_fused_head_equals_the_full_logits_cache(tmp_path, monkeypatch):
    import sstoken.history

    rows = make_rows(n=5)
    model = tiny_model("llama")
    fused = build_nll_cache(model, tiny_tokenizer(), rows, tmp_path / "fused", max_seq_length=64, progress=False)
    monkeypatch.setattr(sstoken.history, "full_logits_reason", lambda model: "forced by the test")
    full = build_nll_cache(model, tiny_tokenizer(), rows, tmp_path / "full", max_seq_length=64, progress=False)
    assert isinstance(fused, NLLCache) and len(fused) == len(rows)
    for key in full._values:
        torch.testing.assert_close(fused.get(key), full.get(key), atol=1e-5, rtol=1e-5)
        assert full.get(key).abs().sum() > 0


def test_a_setting_that_needs_full_logits_falls_back_and_logs_it_once(tmp_path, caplog):
    rows = make_rows()
    with caplog.at_level(logging.WARNING, logger="sstoken.lm_head"):
        trainer = make_trainer(tmp_path, rows, label_smoothing_factor=0.1, selection_method="full")
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
        trainer.model.train()
        smoothed = trainer.compute_loss(trainer.model, dict(batch))
        trainer.compute_loss(trainer.model, dict(batch))
    messages = [r.getMessage() for r in caplog.records if "full B×T×V logits" in r.getMessage()]
    assert len(messages) == 1 and "label smoothing" in messages[0]
    trainer.args.label_smoothing_factor = 0.0
    plain = trainer.compute_loss(trainer.model, dict(batch))
    assert smoothed.item() != pytest.approx(plain.item(), rel=1e-4), "the smoothing is applied, not ignored"


def test_fused_head_is_added_once_and_stays_outermost():
    model = tiny_model("llama")
    lm_head.add_fused_head(model)
    ours = model.forward
    lm_head.add_fused_head(model)
    assert model.forward is ours, "a second call does not wrap again"
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, outputs=("log_probs", "entropy"))  # what SFTTrainer does to the model it trains
    lm_head.add_fused_head(model)
    ids = torch.randint(3, 300, (1, 6))
    outputs = model(input_ids=ids, labels=ids, fused_lm_head=True)
    assert outputs.entropy is None, "the outermost head is ours, computing log_probs only"
