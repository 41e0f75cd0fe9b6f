"""Per-token NLL and the kept-token loss from the hidden states: the full logits' numbers without them."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

from sstoken.selection import lm_head, scoring
from sstoken.selection.nll_cache import NLLCache, build_nll_cache
from sstoken.testing import random_rows, tiny_model, tiny_tokenizer, tiny_trainer

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)


# ----------------------------------------------------------------------------------------------- pure maths
def test_rows_per_chunk_fits_the_byte_budget_and_is_at_least_one():
    assert lm_head.rows_per_chunk(vocab_size=1000, chunk_bytes=4 * 1000 * 3) == 3
    assert lm_head.rows_per_chunk(vocab_size=1000, chunk_bytes=4 * 1000 * 3 + 3999) == 3
    assert lm_head.rows_per_chunk(vocab_size=262_144, chunk_bytes=100) == 1


def test_label_nll_and_lse_by_hand():
    # W = I: the logits are the hidden rows. Row 0: logits (0, ln 3, 0) → lse = ln 5, NLL of token 1 = ln 5 − ln 3.
    hidden = torch.tensor([[0.0, math.log(3.0), 0.0], [0.0, 0.0, 0.0]])
    nll, lse = lm_head.label_nll_and_lse(hidden, torch.tensor([1, 2]), torch.eye(3), None, None, chunk_rows=1)
    torch.testing.assert_close(lse, torch.tensor([math.log(5.0), math.log(3.0)]))
    torch.testing.assert_close(nll, torch.tensor([math.log(5.0 / 3.0), math.log(3.0)]))


def test_label_nll_with_bias_and_softcap_by_hand():
    # logits = 1·tanh((h + b) / 1): h + b = (1.5, 0) → (tanh 1.5, 0); NLL of token 0 = log(e^tanh1.5 + 1) − tanh 1.5.
    hidden, bias = torch.tensor([[2.0, 0.0]]), torch.tensor([-0.5, 0.0])
    nll, _ = lm_head.label_nll_and_lse(hidden, torch.tensor([0]), torch.eye(2), bias, 1.0, chunk_rows=4)
    capped = math.tanh(1.5)
    torch.testing.assert_close(nll, torch.tensor([math.log(math.exp(capped) + 1.0) - capped]))


def test_kept_rows_gradient_by_hand():
    # W = I, h = (0, ln 3), target 1: softmax (1/4, 3/4), dNLL/dh = softmax − one-hot = (1/4, −1/4), dNLL/dW = that ⊗ h.
    hidden = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)
    weight = torch.eye(2, requires_grad=True)
    targets = torch.tensor([1])
    nll, lse = lm_head.label_nll_and_lse(hidden.detach(), targets, weight.detach(), None, None, chunk_rows=1)
    out = lm_head.kept_rows_nll(hidden, targets, nll, lse, weight, None, None, chunk_rows=1)
    torch.testing.assert_close(out, torch.tensor([math.log(4.0 / 3.0)]))
    out.sum().backward()
    torch.testing.assert_close(hidden.grad, torch.tensor([[0.25, -0.25]]))
    torch.testing.assert_close(weight.grad, torch.tensor([[0.0, 0.25 * math.log(3.0)], [0.0, -0.25 * math.log(3.0)]]))


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_kept_rows_nll_has_the_cross_entropy_gradient_in_any_chunking(softcap):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 6, 3, 3, 1])
    row_weights = torch.tensor([1.0, 0.5, 2.0, 0.0, -1.0], dtype=torch.float64)  # any upstream gradient

    reference = F.cross_entropy(lm_head.project(hidden, weight, bias, softcap).double(), targets, reduction="none")
    expected = torch.autograd.grad((reference * row_weights).sum(), (hidden, weight, bias))
    nll, lse = lm_head.label_nll_and_lse(hidden.detach(), targets, weight.detach(), bias.detach(), softcap, 2)
    out = lm_head.kept_rows_nll(hidden, targets, nll, lse, weight, bias, softcap, chunk_rows=2)
    torch.testing.assert_close(out.double(), reference.detach(), atol=1e-6, rtol=1e-6)
    got = torch.autograd.grad((out.double() * row_weights).sum(), (hidden, weight, bias))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


def test_a_keep_mask_outside_the_scored_tokens_is_refused():
    head = torch.nn.Linear(3, 5, bias=False)
    score_mask = torch.tensor([[False, True, False]])
    request = lm_head.HeadRequest(labels=torch.tensor([[1, 2, 3]]), score_mask=score_mask,
                                  select=lambda nll: (torch.tensor([[False, True, True]]), None))
    with pytest.raises(ValueError, match="outside score_mask"):
        lm_head.head_outputs(torch.randn(1, 3, 3), head, None, request)


# ----------------------------------------------------------------------------------------------- when to fall back
@pytest.mark.parametrize("arch, overrides", [
    ("llama", {}),
    ("gemma3_text", dict(head_dim=8, tie_word_embeddings=True, final_logit_softcapping=1.0)),
])
def test_sstoken_head_applies_to_standard_causal_lms_with_lora(arch, overrides):
    model = get_peft_model(tiny_model(arch, **overrides), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert lm_head.full_logits_reason(model) is None


def test_a_model_that_scales_its_logits_falls_back():
    # Granite divides its logits by `logits_scaling`: not softcap(H·Wᵀ + b), caught by the probe whatever it is called.
    assert "are not softcap" in lm_head.full_logits_reason(tiny_model("granite", logits_scaling=4.0))
    model = tiny_model("llama")
    # Scales the logits the module returns; sstoken's head, which the module also runs, returns no logits.
    model.lm_head.register_forward_hook(lambda module, args, output: output * 2.0
                                        if isinstance(output, torch.Tensor) else output)
    assert "are not softcap" in lm_head.full_logits_reason(model)


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
    return random_rows([prompt_len + i % 3 for i in range(n)], [response_len + i % 4 for i in range(n)], seed)


GEMMA3 = dict(head_dim=8, tie_word_embeddings=True, final_logit_softcapping=1.0)  # tied head, softcapped logits


def make_trainer(tmp_path, rows, model=None, lora=True, **overrides):
    settings = dict(max_steps=1, per_device_train_batch_size=len(rows), activation_checkpointing=False,
                    selection_method="sstoken", rho=0.5)
    settings.update(overrides)
    return tiny_trainer(tmp_path / "out", rows, model=model, lora=lora, **settings)


def loss_grads_signals(trainer, batch, autocast: torch.dtype | None = None):
    """One training-mode compute_loss + backward; (loss, LoRA grads, signals, keep). ``autocast``: the loss under
    CPU autocast in that dtype (as accelerate runs the forward with mixed precision), the backward outside it."""
    events = []
    trainer.add_selection_listener(events.append)
    try:
        trainer.model.train()
        trainer.model.zero_grad()
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
    finally:
        trainer.selection_listeners.remove(events.append)
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    (event,) = events
    return loss.item(), grads, event.signals, event.keep


@pytest.mark.parametrize("arch, history", [("llama", "base"), ("llama", "ema"), ("gemma3_text", "base")])
def test_sstoken_head_gives_the_full_logits_loss_grads_and_keep_mask(tmp_path, arch, history):
    rows = make_rows()
    model = tiny_model(arch, **(GEMMA3 if arch == "gemma3_text" else {}))
    trainer = make_trainer(tmp_path, rows, model=model, history=history)
    assert trainer.full_logits_reason is None, "the default path is sstoken's head"
    with torch.no_grad():  # a non-zero adapter, so the current model differs from its history
        gen = torch.Generator().manual_seed(1)
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    ours = loss_grads_signals(trainer, batch)
    trainer.full_logits_reason = "forced by the test"
    full = loss_grads_signals(trainer, batch)

    assert ours[0] == pytest.approx(full[0], rel=1e-5)
    for name in full[1]:
        torch.testing.assert_close(ours[1][name], full[1][name], atol=1e-6, rtol=1e-4)
    response = full[2].response_mask
    torch.testing.assert_close(ours[2].current_nll[response], full[2].current_nll[response], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[2].history_nll[response], full[2].history_nll[response], atol=1e-5, rtol=1e-5)
    assert not torch.equal(full[2].history_nll[response], full[2].current_nll[response])
    assert torch.equal(ours[3], full[3])
    assert 0 < ours[3].sum() < response.sum(), "a real selection: some response tokens dropped"


# Mixed precision: (weights dtype, autocast dtype, LoRA). "bf16 full" trains every weight, the head included.
PRECISIONS = {
    "bf16 autocast": (torch.float32, torch.bfloat16, True),
    "fp16 autocast": (torch.float32, torch.float16, True),
    "bf16 weights": (torch.bfloat16, None, True),
    "bf16 full": (torch.bfloat16, None, False),
}


def _precision_trainer(tmp_path, precision, rows):
    """The tiny llama (vocabulary 4096, so that the head's sums are long) in ``precision``, with a non-zero adapter
    under LoRA (online base history), or fully fine-tuned with attention-only selection (no history needed)."""
    dtype, _, lora = PRECISIONS[precision]
    model = tiny_model("llama", vocab_size=4096).to(dtype)
    settings = dict(history="base") if lora else dict(selection_method="attn")
    trainer = make_trainer(tmp_path / precision.replace(" ", "-"), rows, model=model, lora=lora, **settings)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return trainer


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).norm() / expected.float().norm())


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_mixed_precision_head_gives_the_full_logits_numbers_of_the_same_precision(tmp_path, precision):
    # The NLL, the keep mask and the loss come from the same half-precision logits as the model's own, so they agree
    # to float32 rounding. The gradients agree to bf16 rounding: sstoken's head sums its gradient products in float32
    # where the full-logits backward sums them in the half-precision GEMM (measured here: at most 1.0% apart).
    rows = make_rows(n=4, prompt_len=6, response_len=24)
    trainer = _precision_trainer(tmp_path, precision, rows)
    autocast = PRECISIONS[precision][1]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    ours = loss_grads_signals(trainer, batch, autocast)
    trainer.full_logits_reason = "forced by the test"
    full = loss_grads_signals(trainer, batch, autocast)

    assert ours[0] == pytest.approx(full[0], rel=1e-5)
    response = full[2].response_mask
    torch.testing.assert_close(ours[2].current_nll[response], full[2].current_nll[response], atol=1e-5, rtol=1e-5)
    assert torch.equal(ours[3], full[3])
    trained = [name for name in full[1] if full[1][name].abs().sum() > 0]
    assert any(name.endswith("lm_head.weight") for name in trained) == (precision == "bf16 full")
    for name in trained:
        assert _relative_error(ours[1][name], full[1][name]) < 0.02, name


def test_mixed_precision_keeps_the_fp32_tokens_but_for_near_ties(tmp_path):
    # Half precision moves the NLLs by its rounding, so a token whose score lies within that distance of its sample's
    # cut-off may change sides; any other token keeps its fp32 decision. Bound (scores are in [0, 1]): 0.05. Measured
    # on this batch: autocast keeps exactly the fp32 set; bf16 weights (a rounded model) swap one of 52 kept tokens,
    # two tokens whose fp32 scores were 0.0004 from the cut-off.
    rows = make_rows(n=4, prompt_len=6, response_len=24)
    fp32 = make_trainer(tmp_path / "fp32", rows, model=tiny_model("llama", vocab_size=4096), history="base")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name, param in fp32.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    batch = fp32.data_collator([fp32.train_dataset[i] for i in range(len(rows))])
    _, _, signals, keep = loss_grads_signals(fp32, batch)
    scores = scoring.sstoken_scores(signals.history_nll, signals.current_nll, signals.context_share,
                                    signals.response_mask, gamma=fp32.args.gamma)
    kept_min = torch.where(keep, scores, torch.inf).amin(-1, keepdim=True)
    dropped_max = torch.where(signals.response_mask & ~keep, scores, -torch.inf).amax(-1, keepdim=True)
    cut_off = (kept_min + dropped_max) / 2
    for precision in ("bf16 autocast", "fp16 autocast", "bf16 weights"):
        trainer = _precision_trainer(tmp_path, precision, rows)
        half_keep = loss_grads_signals(trainer, batch, PRECISIONS[precision][1])[3]
        assert torch.equal(half_keep.sum(-1), keep.sum(-1)), "ceil(rho*n) per sample, in any precision"
        changed = half_keep ^ keep
        assert changed.sum() <= 0.1 * keep.sum(), precision
        assert ((scores - cut_off).abs()[changed] <= 0.05).all(), precision


@pytest.mark.parametrize("weighted", [False, True])
def test_full_fine_tuning_of_a_tied_softcapped_head_gets_the_full_logits_gradients(weighted):
    # Gemma 3: the head is the input embedding (tied), so its gradient has a head part and an embedding part.
    # With token weights, the head's Σ wᵢ·NLLᵢ has the gradient of the full logits' weighted cross-entropy.
    model = tiny_model("gemma3_text", **GEMMA3)
    lm_head.add_sstoken_head(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (2, 9), generator=gen)
    labels = ids.clone()
    labels[:, :3] = scoring.IGNORE_INDEX
    response = scoring.response_mask_from_labels(labels)
    keep = response & (torch.rand(response.shape, generator=gen) < 0.6)
    weights = 0.1 + 2 * torch.rand(response.shape, generator=gen) if weighted else None

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    outputs = model(input_ids=ids, sstoken_head=lm_head.HeadRequest(labels, response,
                                                                     select=lambda nll: (keep, weights)))
    ours = grads(outputs.kept_nll_sum)
    logits = model(input_ids=ids).logits
    rows, cols = keep.nonzero(as_tuple=True)
    token_loss = F.cross_entropy(logits[rows, cols - 1], labels[rows, cols], reduction="none")
    full_sum = (token_loss * (1.0 if weights is None else weights[rows, cols])).sum()
    full = grads(full_sum)
    assert outputs.kept_nll_sum.item() == pytest.approx(full_sum.item(), rel=1e-5)
    assert torch.equal(outputs.keep, keep)
    assert ours.keys() == full.keys() and "model.embed_tokens.weight" in ours
    for name in full:
        torch.testing.assert_close(ours[name], full[name], atol=1e-6, rtol=1e-4)
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none").detach()
    torch.testing.assert_close(outputs.token_nll[:, 1:], torch.where(response[:, 1:], nll, 0.0), atol=1e-6, rtol=1e-5)


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op allocates while active (views are not counted:
    ``weight.t()`` inside a matmul is the weight, not a new V-wide tensor)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        storages = {t.untyped_storage().data_ptr() for t in inputs}
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in storages:
                self.largest = max(self.largest, tensor.numel())
        return out


def _refuse_lm_head_calls(model):
    def refuse(module, args, output):
        # sstoken's head runs inside the head module too, and returns no logits. The one-off check of the head
        # against the model's own logits (full_logits_reason) builds them for a few tokens; anything more is the
        # full logits.
        if isinstance(output, torch.Tensor) and output.shape[-2] > lm_head.PROBE_TOKENS:
            raise AssertionError(f"lm_head returned {tuple(output.shape)} logits: full logits built")

    return model.get_output_embeddings().register_forward_hook(refuse)


def _one_step_largest_tensor(trainer, rows):
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trainer.model.train()
    with _LargestTensor() as probe:
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
    assert math.isfinite(loss.item())
    return probe.largest, batch["input_ids"].shape


def test_default_path_never_builds_batch_by_length_by_vocab_logits(tmp_path):
    vocab = 70_000
    rows = make_rows(n=2, prompt_len=10, response_len=30)
    model = tiny_model("llama", vocab_size=vocab)
    hook = _refuse_lm_head_calls(model)
    trainer = make_trainer(tmp_path, rows, model=model, history="base")  # online base history pass included
    assert trainer.full_logits_reason is None
    largest, (batch_size, length) = _one_step_largest_tensor(trainer, rows)
    assert largest < batch_size * (length - 1) * vocab

    cache_rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]
    with _LargestTensor() as probe:
        build_nll_cache(model, tiny_tokenizer(), cache_rows, tmp_path / "cache", max_seq_length=64, progress=False)
    assert probe.largest < batch_size * (length - 1) * vocab
    hook.remove()


def test_logits_never_exceed_one_chunk_of_rows(tmp_path, monkeypatch):
    vocab, chunk_rows = 20_000, 4
    monkeypatch.setitem(lm_head.LOGITS_CHUNK_BYTES, "cpu", 4 * vocab * chunk_rows)
    rows = make_rows(n=2, prompt_len=10, response_len=30)
    trainer = make_trainer(tmp_path, rows, model=tiny_model("llama", vocab_size=vocab), history="base")
    largest, _ = _one_step_largest_tensor(trainer, rows)
    kept = sum(scoring.keep_count(len(r["input_ids"]) - r["labels"].count(-100), 0.5) for r in rows)
    assert kept > 4 * chunk_rows, "several chunks of kept rows in the backward"
    assert largest == chunk_rows * vocab  # one chunk of logits (the head weight itself is no op's output)


def test_cache_through_sstoken_head_equals_the_full_logits_cache(tmp_path, monkeypatch):
    import sstoken.selection.lm_head

    rows = make_rows(n=5)
    model = tiny_model("llama")
    ours = build_nll_cache(model, tiny_tokenizer(), rows, tmp_path / "ours", max_seq_length=64, progress=False)
    monkeypatch.setattr(sstoken.selection.lm_head, "full_logits_reason", lambda model, smoothing=0.0: "forced by the test")
    full = build_nll_cache(model, tiny_tokenizer(), rows, tmp_path / "full", max_seq_length=64, progress=False)
    assert isinstance(ours, NLLCache) and len(ours) == len(rows)
    for key in full._values:
        torch.testing.assert_close(ours.get(key), full.get(key), atol=1e-5, rtol=1e-5)
        assert full.get(key).abs().sum() > 0


def test_a_setting_that_needs_full_logits_falls_back_and_logs_it_once(tmp_path, caplog):
    rows = make_rows()
    with caplog.at_level(logging.WARNING, logger="sstoken.selection.lm_head"):
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


def test_sstoken_head_is_added_once_and_stays_outermost():
    model = tiny_model("llama")
    lm_head.add_sstoken_head(model)
    ours = model.forward
    lm_head.add_sstoken_head(model)
    assert model.forward is ours, "a second call does not wrap again"
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, outputs=("log_probs", "entropy"))  # what SFTTrainer does to the model it trains
    lm_head.add_sstoken_head(model)
    ids = torch.randint(3, 300, (1, 6))
    outputs = model(input_ids=ids, sstoken_head=lm_head.HeadRequest(ids, torch.ones_like(ids, dtype=torch.bool)))
    assert isinstance(outputs, lm_head.HeadOutput) and outputs.token_nll[0, 1:].gt(0).all()
    assert model(input_ids=ids).logits.shape == (1, 6, model.config.vocab_size), "without the request: unchanged"


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_mixed_precision_gradient_is_the_autocast_full_logits_gradient(softcap):
    # Under bf16 autocast the NLL and log-sum-exp come from bf16 logits, and the backward recomputes them under
    # the same autocast: the result is the autocast full-logits gradient up to bf16 rounding of the matmuls.
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(24, 16, generator=gen, requires_grad=True)
    head = torch.nn.Linear(16, 300, bias=False)
    targets = torch.randint(0, 300, (24,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = F.cross_entropy(lm_head.project(hidden, head.weight, None, softcap), targets, reduction="sum")
        nll, lse = lm_head.label_nll_and_lse(hidden.detach(), targets, head.weight, None, softcap, chunk_rows=5)
        ours = lm_head.kept_rows_nll(hidden, targets, nll, lse, head.weight, None, softcap, chunk_rows=5).sum()
    expected = torch.autograd.grad(reference, hidden)[0]
    got = torch.autograd.grad(ours, hidden)[0]
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(got, expected, atol=3e-3, rtol=2e-2)
    assert got.abs().max() > 0.05  # not a vanishing gradient passing the tolerance trivially


def _fused_head_gradients(kernel, hidden, weight, targets, row_weights, autocast):
    """(hidden gradient, weight gradient or None) of Σ row_weight · NLL through ``kernel`` ("trl" or "sstoken")."""
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, _ChunkedLogProbFunction

    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_(weight.requires_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if kernel == "trl":
            nll = -_ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None,
                                                 1.0, ("log_probs",))[0]
        else:
            nll, lse = lm_head.label_nll_and_lse(hidden.detach(), targets, weight.detach(), None, None, chunk_rows=16)
            nll = lm_head.kept_rows_nll(hidden, targets, nll, lse, weight, None, None, chunk_rows=16)
    (nll * row_weights).sum().backward()  # outside autocast, as a trainer calls it
    return hidden.grad, weight.grad


@pytest.mark.parametrize("case", ["frozen fp32 head, bf16 autocast", "trained bf16 head, bf16 weights"])
def test_half_precision_gradient_is_as_close_to_float64_as_trls_fused_head(case):
    # TRL's fused head sums its gradient products in float32 (bf16 operands, float32 output). sstoken's head must be
    # at least as accurate on the same inputs: once, it multiplied the logits' gradient into the hidden and weight
    # gradients in bf16 (rounding each row chunk's product to 8 mantissa bits), 20-30% further from float64.
    gen = torch.Generator().manual_seed(0)
    autocast = case.startswith("frozen")
    dtype = torch.float32 if autocast else torch.bfloat16
    hidden = torch.randn(64, 256, generator=gen).to(dtype)
    weight = (torch.randn(8192, 256, generator=gen) * 0.05).to(dtype).requires_grad_(not autocast)
    targets = torch.randint(0, 8192, (64,), generator=gen)
    row_weights = torch.rand(64, generator=gen) + 0.5  # any upstream gradient

    exact_hidden = hidden.double().requires_grad_()
    exact_weight = weight.detach().double().requires_grad_(weight.requires_grad)
    exact_nll = F.cross_entropy(exact_hidden @ exact_weight.t(), targets, reduction="none")
    (exact_nll * row_weights.double()).sum().backward()

    def error(got, exact):
        return float((got.double() - exact).norm() / exact.norm())

    ours = _fused_head_gradients("sstoken", hidden, weight, targets, row_weights, autocast)
    trls = _fused_head_gradients("trl", hidden, weight, targets, row_weights, autocast)
    assert error(ours[0], exact_hidden.grad) <= error(trls[0], exact_hidden.grad)
    assert error(ours[0], exact_hidden.grad) < 1e-2, "a gradient, not noise"
    if weight.requires_grad:
        assert error(ours[1], exact_weight.grad) <= error(trls[1], exact_weight.grad)


def test_the_backward_softmax_sums_to_one_whatever_the_forward_log_sum_exp():
    # The backward reuses the forward's log-sum-exp, computed over other row chunks; a half-precision GEMM may round
    # a recomputed logit differently. The softmax is normalised by its own sum, so the gradient stays the
    # cross-entropy gradient of the logits it recomputed: here with a log-sum-exp off by 0.05 for every row.
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 8, generator=gen, dtype=torch.float64)
    targets = torch.tensor([0, 10, 3, 3, 1, 7])
    expected = torch.autograd.grad(F.cross_entropy(hidden @ weight.t(), targets, reduction="sum"), hidden)[0]
    nll, lse = lm_head.label_nll_and_lse(hidden.detach(), targets, weight, None, None, chunk_rows=4)
    out = lm_head.kept_rows_nll(hidden, targets, nll, lse + 0.05, weight, None, None, chunk_rows=4)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), hidden)[0], expected, atol=1e-6, rtol=1e-5)


class _WeightCasts(TorchDispatchMode):
    """Counts the dtype conversions of tensors shaped like ``shape`` (the head weight) while active."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == self.shape:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_a_frozen_fp32_head_is_cast_to_bf16_once_per_pass_under_autocast():
    # Autocast caches its casts only of weights that require grad: a frozen (LoRA) head was cast to bf16 again for
    # every chunk of rows, a full V×d copy each time.
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=gen, requires_grad=True)
    weight = torch.randn(300, 16, generator=gen)
    targets = torch.randint(0, 300, (40,), generator=gen)
    with _WeightCasts(weight.shape) as forward_casts, torch.autocast("cpu", dtype=torch.bfloat16):
        nll, lse = lm_head.label_nll_and_lse(hidden.detach(), targets, weight, None, None, chunk_rows=4)
        loss = lm_head.kept_rows_nll(hidden, targets, nll, lse, weight, None, None, chunk_rows=4).sum()
    with _WeightCasts(weight.shape) as backward_casts:
        loss.backward()
    assert forward_casts.count == 1 and backward_casts.count == 1, "ten chunks of rows, one cast each way"
    assert hidden.grad.abs().max() > 0
