"""``python benchmarks/quality.py``: token selectors against full SFT on generated tasks with known, injected noise.

Pipeline, per seed (the seed draws the data, the LoRA init and the batch order):

1. generate a training set (reading comprehension + arithmetic word problems) whose responses carry
   boilerplate, wrong facts and corrupted words at fixed rates, plus a clean held-out test set;
2. cache the base model's per-token NLL over the noisy training rows once (history for rel / sstoken and
   the "before" side of tokencleaning);
3. train a reference model (base + LoRA, full SFT) on the clean versions of a small subset (20%) and cache
   its NLL over the noisy training rows (rho1 and tokencleaning);
4. train every method with the same LoRA settings, steps and seed through ``SSTokenTrainer``;
5. score each trained model on the clean test set: exact match and answer accuracy of greedy answers, and
   the mean NLL of the clean reference responses.

While each method trains, every keep mask is compared with the generator's per-token noise record, giving
the fraction of noise tokens and of clean tokens that the selector kept (overall, and in the first and last
quarter of the steps, which shows the cold start of REL).

The model is loaded once per process and deep-copied per run: loading SmolLM2 costs ~40 s on CPU.

Run from the repository root (the benchmarks are not part of the installed package); the default output is
``benchmarks/results/quality.json`` in the repository.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import selection_research
from tasks import NoiseLevels, answer_correct, exact_match, make_splits

from sstoken.io import atomic_write_json
from sstoken.training.config import method_settings

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# name -> SSTokenConfig overrides; "clean" trains on the clean twins of the same rows (the ceiling)
METHODS: dict[str, dict] = {
    "full_clean": {"selection_method": "full", "clean": True},
    "full_noisy": {"selection_method": "full"},
    "random": {"selection_method": "random"},
    "rho1": {"selection_method": "rho1", "reference": True},
    "tokencleaning": {"selection_method": "tokencleaning", "reference": True, "base_cache": True},
    "rel": {"selection_method": "rel", "base_cache": True},
    "attn": {"selection_method": "attn"},
    "sstoken": {"selection_method": "sstoken", "base_cache": True},
    "sstoken_warmup": {"selection_method": "sstoken", "base_cache": True, "attention_warmup": 0.3},
    "dft": method_settings("dft"),  # full SFT with DFT's loss: every token weighted by its probability
}
# The selector the selection research (BENCHMARKS.md "Selection research") recommends, written into
# every quality JSON with its one-line reason; None while no reference-free selector meets the bar.
RECOMMENDED: str | None = None
RECOMMENDED_REASON = ("no reference-free selector met the selection research's bar (clean-answer NLL <= 1.913 and "
                      "better than random, rho1, tokencleaning, rel and attn beyond the seed spread); see "
                      "BENCHMARKS.md, Selection research, round 2")
# Experimental reference-free variants: run on request (--methods x_...), not by default.
RESEARCH_METHODS: dict[str, dict] = dict(selection_research.QUALITY_METHODS)
ALL_METHODS: dict[str, dict] = {**METHODS, **RESEARCH_METHODS}


@dataclass
class Size:
    """Everything that sets the cost of a run; ``default`` is sized for a shared 2-core CPU."""

    n_train: int
    n_test: int
    max_steps: int
    batch_size: int
    reference_fraction: float
    reference_steps: int
    learning_rate: float
    lora_r: int
    max_new_tokens: int
    max_seq_length: int = 256
    rho: float = 0.6
    gamma: float = 0.5
    noise: NoiseLevels = field(default_factory=NoiseLevels)


SIZES = {
    # The default: a small llama (hidden 64, 2 layers, ~130k parameters) pretrained from scratch on plain
    # text of the same world (see tasks.pretraining_document), then LoRA-SFT on the noisy chat data. The
    # embedded SmolLM2-135M measured ~85 s per training step (batch 8 x 75 tokens) on the shared 2-core CPU
    # this was built on, so a 27-run benchmark with it cannot fit an hour there; `--model smollm2` runs the
    # same pipeline with it where there is more compute.
    # 40 steps x 16 = 640 samples = 2 epochs of 320 rows (REL is ~0 at step 0, when LoRA's B = 0 makes the
    # current model equal the base, and grows as the model learns). Steps were cut from 60 to 40, and the
    # LoRA rate raised to 5e-3 (at 3e-3 full SFT on clean data reached 10% answer accuracy in 60 steps),
    # so that 27 runs fit ~40 minutes of the shared CPU.
    "small": Size(n_train=320, n_test=80, max_steps=40, batch_size=16, reference_fraction=0.2,
                  reference_steps=20, learning_rate=5e-3, lora_r=16, max_new_tokens=24),
    # For a GPU (`--model medium --device cuda`): a 4-layer, hidden-256 llama pretrained longer, more data
    # and steps. Not runnable in an hour on a 2-core CPU.
    "medium": Size(n_train=2000, n_test=200, max_steps=150, batch_size=32, reference_fraction=0.2,
                   reference_steps=80, learning_rate=2e-3, lora_r=16, max_new_tokens=24),
    "smollm2": Size(n_train=320, n_test=80, max_steps=60, batch_size=8, reference_fraction=0.2,
                    reference_steps=24, learning_rate=5e-4, lora_r=16, max_new_tokens=24),
    # mechanics only: a tiny random model learns nothing; numbers from it mean nothing
    "tiny": Size(n_train=16, n_test=6, max_steps=2, batch_size=4, reference_fraction=0.25, reference_steps=1,
                 learning_rate=1e-3, lora_r=4, max_new_tokens=4, max_seq_length=256),
}

SMALL_MODEL = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, pretrain_steps=400, pretrain_batch=32, pretrain_lr=3e-3)
MEDIUM_MODEL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=4, vocab_size=1024, pretrain_steps=3000, pretrain_batch=64, pretrain_lr=1e-3)
ARCHS = {"small": SMALL_MODEL, "medium": MEDIUM_MODEL}
REPO_ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ encoding
def encode_examples(examples, tokenizer, max_seq_length: int, clean: bool = False):
    """Rows {input_ids, labels} and a parallel list of per-token noise flags (kind or None) per row."""
    from sstoken.data.encoding import encode_row
    from sstoken.data.templates import render_chat

    rows, flags = [], []
    for ex in examples:
        response = ex.clean_response if clean else ex.response
        messages = ex.messages(response)
        encoded = encode_row({"messages": messages}, tokenizer, max_seq_length)
        if encoded is None:
            continue
        ids = encoded.input_ids
        # encode_row tokenises the full rendering with offsets; redo that to map noise spans to tokens
        full = render_chat(tokenizer, messages, False)
        start = len(render_chat(tokenizer, messages[:-1], True))
        enc = tokenizer(full, return_offsets_mapping=True, add_special_tokens=False)
        token_flags: list[str | None] = [None] * len(ids)
        if list(enc["input_ids"][:len(ids)]) == list(ids) and not clean:
            for t, (s, e) in enumerate(enc["offset_mapping"][:len(ids)]):
                for ns, ne, kind in ex.noise_spans:
                    if s < start + ne and e > start + ns:
                        token_flags[t] = kind
                        break
                # a clean token of the correct answer: "answer" (counted as clean everywhere, and on its own)
                span = ex.answer_span
                if token_flags[t] is None and span is not None and s < start + span[1] and e > start + span[0] \
                        and encoded.labels[t] != -100:
                    token_flags[t] = "answer"
        rows.append({"input_ids": list(ids), "labels": list(encoded.labels)})
        flags.append(token_flags)
    return rows, flags


def _write_cache(values: dict, rows, tokenizer, path, max_seq_length: int, model_name: str):
    from sstoken.selection.nll_cache import (
        CacheFingerprints,
        NLLCache,
        data_fingerprint,
        plan_shards,
        tokenizer_fingerprint,
    )

    shard_keys = plan_shards(rows, 1024)
    fingerprints = CacheFingerprints(model=model_name, tokenizer=tokenizer_fingerprint(tokenizer),
                                     data=data_fingerprint(values), max_seq_length=int(max_seq_length))
    cache = NLLCache.create_or_resume(path, fingerprints, shard_keys)
    for index, keys in enumerate(shard_keys):
        cache.write_shard(index, {key: values[key] for key in keys})
    return NLLCache.open(path, fingerprints, role="reference cache")


def build_noprompt_cache(model, tokenizer, rows, path, max_seq_length: int, device: str, batch_size: int = 16):
    """Per-token NLL of the response by ``model`` *without the system and user turns* (the row cut at its last
    ``<|im_start|>`` before the response), stored at the response's positions of the full row (0 elsewhere).

    With the base NLL of the full row it gives each response token's grounding in the prompt,
    NLL(no prompt) − NLL(with prompt), for the ``x_grounded`` research selector (read as its reference NLL)."""
    import torch

    from sstoken.batch import pad_rows
    from sstoken.selection import scoring
    from sstoken.selection.nll_cache import sample_key

    start_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cuts, cut_rows = [], []
    for row in rows:
        labels = row["labels"]
        first = next((t for t, label in enumerate(labels) if label != -100), len(labels))
        cut = selection_research.last_turn_start(row["input_ids"][:first], start_id)
        cuts.append(cut)
        cut_rows.append({"input_ids": row["input_ids"][cut:], "labels": labels[cut:]})
    values = {}
    model = model.to(device).eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            ids, labels, mask = pad_rows(cut_rows[i:i + batch_size], pad_id)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.cpu()
            nll = scoring.token_nll(logits, labels)
            for r, row in enumerate(rows[i:i + batch_size]):
                full = torch.zeros(len(row["input_ids"]), dtype=torch.float32)
                full[cuts[i + r]:] = nll[r, :len(cut_rows[i + r]["input_ids"])]
                values[sample_key(row["input_ids"])] = full
    return _write_cache(values, rows, tokenizer, path, max_seq_length, "base-without-prompt")


def build_noise_cache(rows, flags, tokenizer, path, max_seq_length: int):
    """The per-token noise record as an NLL cache (value = selection_research.NOISE_CODES of the token's kind).

    Lets the oracle selectors of the selection research read the record through the trainer's reference-cache
    lookup (by sample key, aligned to the predicted token, as KeepRecorder counts it)."""
    import torch

    from sstoken.selection.nll_cache import sample_key

    values = {}
    for row, row_flags in zip(rows, flags):
        codes = [selection_research.NOISE_CODES[kind or "clean"] for kind in row_flags]
        values[sample_key(row["input_ids"])] = torch.tensor(codes, dtype=torch.float32)
    return _write_cache(values, rows, tokenizer, path, max_seq_length, "noise-record")


# ------------------------------------------------------------------------------------------------ recording
class KeepRecorder:
    """Counts, per noise kind, how many response tokens the selector saw and kept (by quarter of training)."""

    def __init__(self, flags_by_key: dict[str, list]):
        self.flags_by_key = flags_by_key
        self.counts: dict[str, dict[str, list[int]]] = {}  # phase -> kind -> [kept, total]
        self.unmatched = 0

    def add(self, input_ids, valid, response, keep, progress: float):
        from sstoken.selection.nll_cache import sample_key

        phases = ["all"] + (["first_quarter"] if progress < 0.25 else []) + (["last_quarter"] if progress >= 0.75
                                                                            else [])
        for b in range(input_ids.shape[0]):
            n = int(valid[b].sum().item())
            flags = self.flags_by_key.get(sample_key(input_ids[b, :n]))
            if flags is None:
                self.unmatched += 1
                continue
            resp = response[b, :n].tolist()
            kept = keep[b, :n].tolist()
            first = next((t for t in range(n) if resp[t]), None)
            for t in range(n):
                if not resp[t]:
                    continue
                kind = flags[t] or "clean"
                keys = ("clean", "answer") if kind == "answer" else (kind,) if kind == "clean" else (kind, "noise")
                if t == first and kind in ("clean", "answer"):
                    keys = (*keys, "first")  # a response that opens cleanly: its first token, as at test time
                for phase in phases:
                    for key in keys:
                        slot = self.counts.setdefault(phase, {}).setdefault(key, [0, 0])
                        slot[0] += kept[t]
                        slot[1] += 1

    def __call__(self, event) -> None:
        """Selection listener (SSTokenTrainer's ``selection_listeners``): compare one keep mask with the record."""
        inputs = event.inputs
        if inputs.get("position_ids") is not None:
            return  # packed rows: a row is not one sample, so its key matches no noise record
        input_ids = inputs["input_ids"]
        valid = inputs.get("attention_mask")
        valid = valid.bool() if valid is not None else input_ids.new_ones(input_ids.shape, dtype=bool)
        self.add(input_ids.cpu(), valid.cpu(), event.signals.response_mask.cpu(), self.values(event).cpu(),
                 event.progress)

    def values(self, event):
        """What is added up per kind for each response token (its mean is the rate): 1 for a kept token."""
        return event.keep

    def rates(self) -> dict:
        return {phase: {kind: (k / n if n else None) for kind, (k, n) in kinds.items()}
                for phase, kinds in self.counts.items()}


class SignalRecorder:
    """Research: every response token's reference-free signals with its noise kind and the training
    progress, to measure how well each signal separates noise from clean (``signal_separation``)."""

    def __init__(self, flags_by_key: dict[str, list]):
        self.flags_by_key = flags_by_key
        self.rows: dict[str, list] = {k: [] for k in ("kind", "late", *selection_research.PROBE_SIGNALS)}

    def __call__(self, event) -> None:
        import torch

        from sstoken.selection.nll_cache import sample_key

        s = event.signals
        input_ids = event.inputs["input_ids"].cpu()
        valid = event.inputs["attention_mask"].bool().cpu()
        response = s.response_mask.cpu()
        base, current = s.history_nll.float().cpu(), s.current_nll.float().cpu()
        share = s.context_share.float().cpu()
        no_prompt = s.reference_nll.float().cpu()
        for b in range(input_ids.shape[0]):
            n = int(valid[b].sum())
            flags = self.flags_by_key.get(sample_key(input_ids[b, :n]))
            if flags is None:
                continue
            positions = [t for t in range(n) if response[b, t]]
            if not positions:
                continue
            idx = torch.tensor(positions)
            values = {"base_nll": base[b, idx], "current_nll": current[b, idx], "rel": base[b, idx] - current[b, idx],
                      "context_share": share[b, idx], "grounding": no_prompt[b, idx] - base[b, idx]}
            for name, v in list(values.items()):
                # the per-sample view a top-ρ-per-sample selector sees: min-max within the sample
                span = (v.max() - v.min()).clamp(min=1e-8)
                values[name + "_in_sample"] = (v - v.min()) / span
            for i, t in enumerate(positions):
                self.rows["kind"].append("clean" if flags[t] in (None, "answer") else flags[t])
                self.rows["late"].append(event.progress >= 0.5)
                for name, v in values.items():
                    self.rows[name].append(float(v[i]))

    def separation(self) -> dict:
        """Per signal, half of training and noise target: the ROC area of the better orientation, that
        orientation, and the share of clean tokens dropped when 90% of that noise is dropped."""
        import torch

        kind = self.rows["kind"]
        late = torch.tensor(self.rows["late"])
        out = {}
        targets = {"boilerplate+corrupt": ("boilerplate", "corrupt"), "boilerplate": ("boilerplate",),
                   "corrupt": ("corrupt",), "wrong_fact": ("wrong_fact",)}
        for half, sel in (("first_half", ~late), ("second_half", late)):
            for signal in selection_research.PROBE_SIGNALS:
                values = torch.tensor(self.rows[signal])
                for target, kinds in targets.items():
                    is_noise = torch.tensor([k in kinds for k in kind]) & sel
                    is_clean = torch.tensor([k == "clean" for k in kind]) & sel
                    if not is_noise.any() or not is_clean.any():
                        continue
                    area = selection_research.auc(values[is_noise], values[is_clean])
                    sign = 1.0 if area >= 0.5 else -1.0
                    out.setdefault(half, {}).setdefault(signal, {})[target] = {
                        "auc": max(area, 1 - area), "noise_is": "high" if sign > 0 else "low",
                        "clean_dropped_at_90pct_noise_recall": selection_research.false_drop_at_recall(
                            sign * values[is_noise], sign * values[is_clean], 0.9)}
        return out


# ------------------------------------------------------------------------------------------------ evaluation
def _eval_nll(model, rows, pad_id: int, device: str, batch_size: int = 16) -> float:
    """Mean per-token NLL of the clean reference responses (token-weighted over the whole test set)."""
    import torch

    from sstoken.batch import pad_rows
    from sstoken.selection import scoring

    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = rows[i:i + batch_size]
            ids, labels, mask = pad_rows(batch, pad_id)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.cpu()
            nll = scoring.token_nll(logits, labels)
            response = scoring.response_mask_from_labels(labels) & mask.bool()
            total += float(nll[response].sum())
            count += int(response.sum())
    return total / max(count, 1)


def _greedy(model, tokenizer, examples, max_new_tokens: int, device: str, batch_size: int = 40) -> list[str]:
    import torch

    from sstoken.data.templates import render_chat

    model.eval()
    outputs = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last prompt token
    try:
        for i in range(0, len(examples), batch_size):
            batch = examples[i:i + batch_size]
            texts = [render_chat(tokenizer, ex.prompt_messages(), True) for ex in batch]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for row in out[:, enc["input_ids"].shape[1]:].cpu():
                outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = side
    return outputs


# ------------------------------------------------------------------------------------------------ training
def _trainable_copy(base):
    """A fresh copy of the base model for one run (sstoken.models.load_model already dropped the GGUF
    quantisation marker of the embedded model, which the HF Trainer would refuse)."""
    return copy.deepcopy(base)


def _config(size: Size, out_dir: str, seed: int, device: str, **overrides):
    from sstoken.training.config import SSTokenConfig

    kwargs = dict(output_dir=out_dir, max_steps=size.max_steps, per_device_train_batch_size=size.batch_size,
                  learning_rate=size.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
                  logging_steps=10_000, report_to="none", save_strategy="no", use_cpu=device == "cpu", seed=seed,
                  data_seed=seed, selection_seed=seed, rho=size.rho, gamma=size.gamma, disable_tqdm=True,
                  dataloader_num_workers=0, activation_checkpointing=False, max_length=size.max_seq_length)
    kwargs.update(overrides)
    return SSTokenConfig(**kwargs)


def _lora(size: Size):
    from peft import LoraConfig

    return LoraConfig(r=size.lora_r, lora_alpha=2 * size.lora_r, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")


def _trainer_class(history_source: str | None, tokenizer):
    """SSTokenTrainer, or (research) a subclass whose history NLL comes from another source."""
    from sstoken.training.trainer import SSTokenTrainer

    if history_source is None:
        return SSTokenTrainer
    if history_source != "noprompt_current":
        raise SystemExit(f"unknown history_source {history_source!r}")
    source = selection_research.NoPromptCurrentHistory(tokenizer.convert_tokens_to_ids("<|im_start|>"),
                                                       tokenizer.pad_token_id or 0)

    class NoPromptHistoryTrainer(SSTokenTrainer):
        def _signal_sources(self):
            sources = super()._signal_sources()
            sources.history = source
            return sources

    return NoPromptHistoryTrainer


def _train(base, tokenizer, rows, size: Size, out_dir: str, seed: int, device: str,
           recorder: KeepRecorder | None = None, history_source: str | None = None, signal_recorder=None,
           **overrides):
    from sstoken.data.encoding import to_hf_dataset

    trainer = _trainer_class(history_source, tokenizer)(model=_trainable_copy(base), args=_config(size, out_dir, seed, device, **overrides),
                             train_dataset=to_hf_dataset(rows), processing_class=tokenizer, peft_config=_lora(size),
                             selection_listeners=[r for r in (recorder, signal_recorder) if r is not None] or None)
    trainer.train()
    return trainer


# ------------------------------------------------------------------------------------------------ driver
def _small_tokenizer(vocab_size: int):
    """Byte-level BPE with ChatML specials, trained on text of the task world (names/cities are one token)."""
    from tasks import tokenizer_corpus
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sstoken.testing import CHATML_TEMPLATE

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _small_base(log, device: str, arch: str = "small"):
    """The small pretrained base: built once (plain PyTorch loop, CPU) and cached under ~/.cache/sstoken."""
    import hashlib
    import random

    import torch
    from tasks import pretraining_document
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    SMALL_MODEL = ARCHS[arch]  # noqa: N806 (the architecture table of this size)
    spec = json.dumps(SMALL_MODEL, sort_keys=True) + "|v1"
    folder = Path(os.environ.get("SSTOKEN_CACHE", Path.home() / ".cache" / "sstoken")) / (
        f"quality-{arch}-" + hashlib.sha256(spec.encode()).hexdigest()[:12])
    if (folder / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = PreTrainedTokenizerFast.from_pretrained(folder)
        return model, tok, {"cached": str(folder)}
    started = time.time()
    tok = _small_tokenizer(SMALL_MODEL["vocab_size"])
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tok), hidden_size=SMALL_MODEL["hidden_size"],
        intermediate_size=SMALL_MODEL["intermediate_size"], num_hidden_layers=SMALL_MODEL["num_hidden_layers"],
        num_attention_heads=SMALL_MODEL["num_attention_heads"], num_key_value_heads=SMALL_MODEL["num_key_value_heads"],
        max_position_embeddings=512, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
        tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=SMALL_MODEL["pretrain_lr"], weight_decay=0.01)
    rng = random.Random("pretrain")
    model.train()
    loss = None
    for step in range(SMALL_MODEL["pretrain_steps"]):
        docs = [pretraining_document(rng) for _ in range(SMALL_MODEL["pretrain_batch"])]
        enc = tok(docs, return_tensors="pt", padding=True).to(device)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 100 == 0:
            log(f"pretraining the {arch} base: step {step} loss {loss.item():.3f}")
    model.eval()
    model.to("cpu")  # the base is deep-copied per run; the trainer moves each copy to the device
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    info = {"pretrain_s": time.time() - started, "pretrain_final_loss": float(loss.item())}
    log(f"{arch} base pretrained in {info['pretrain_s']:.0f}s (final loss {info['pretrain_final_loss']:.3f})")
    return model, tok, info


def _load(kind: str, log, device: str):
    if kind == "tiny":
        from sstoken.testing import tiny_model, tiny_tokenizer

        return tiny_model("llama", seed=0), tiny_tokenizer(), "tiny random llama (sstoken.testing)", {}
    if kind in ARCHS:
        model, tok, info = _small_base(log, device, kind)
        n = sum(p.numel() for p in model.parameters())
        return model, tok, f"{kind} llama pretrained from scratch ({n / 1e3:.0f}k parameters)", info
    from sstoken.models import EMBEDDED_MODEL, load_model, load_tokenizer

    return load_model(None), load_tokenizer(None), EMBEDDED_MODEL, {}


def run_seed(base, tokenizer, size: Size, seed: int, methods: list[str], work: Path, log,
             device: str) -> list[dict]:
    import torch

    from sstoken.selection.nll_cache import build_nll_cache, sample_key

    torch.manual_seed(seed)
    splits = make_splits(size.n_train, size.n_test, seed, size.noise)
    noisy_rows, noisy_flags = encode_examples(splits["train"], tokenizer, size.max_seq_length)
    clean_rows, _ = encode_examples(splits["train"], tokenizer, size.max_seq_length, clean=True)
    test_examples = splits["test"]
    test_rows, _ = encode_examples(test_examples, tokenizer, size.max_seq_length, clean=True)
    flags_by_key = {sample_key(r["input_ids"]): f for r, f in zip(noisy_rows, noisy_flags)}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    shared_cost = {}
    needs = {k for m in methods for k, v in ALL_METHODS[m].items() if v is True}
    base_cache = reference_cache = None
    if "base_cache" in needs:
        started = time.time()
        base_cache = str(work / f"base_s{seed}")
        # the base model (no adapter) scored once; every method with history 'base' looks it up
        build_nll_cache(_trainable_copy(base).to(device), tokenizer, noisy_rows, base_cache, size.max_seq_length,
                        progress=False)
        shared_cost["base_cache_s"] = time.time() - started
        log(f"seed {seed}: base NLL cache in {shared_cost['base_cache_s']:.0f}s")
    if "reference" in needs:
        started = time.time()
        n_ref = max(1, round(size.reference_fraction * len(clean_rows)))
        # the reference sees the clean versions of a small subset: a curated set, as in Rho-1 / TokenCleaning
        ref = _train(base, tokenizer, clean_rows[:n_ref], size, str(work / f"ref_s{seed}"), seed, device,
                     selection_method="full", max_steps=size.reference_steps)
        reference_cache = str(work / f"ref_s{seed}_cache")
        build_nll_cache(ref.model, tokenizer, noisy_rows, reference_cache, size.max_seq_length, progress=False)
        shared_cost["reference_s"] = time.time() - started
        shared_cost["reference_rows"] = n_ref
        shared_cost["reference_test_nll"] = _eval_nll(ref.model, test_rows, pad_id, device)
        del ref
        log(f"seed {seed}: reference ({n_ref} clean rows, {size.reference_steps} steps) + cache in "
            f"{shared_cost['reference_s']:.0f}s, clean test NLL {shared_cost['reference_test_nll']:.3f}")

    noise_cache = None
    if "noise_cache" in needs:
        # the generator's noise record as a cache (oracles read it as their reference NLL)
        noise_cache = str(work / f"noise_s{seed}")
        build_noise_cache(noisy_rows, noisy_flags, tokenizer, noise_cache, size.max_seq_length)
    noprompt_cache = None
    if "noprompt_cache" in needs:
        noprompt_cache = str(work / f"noprompt_s{seed}")
        build_noprompt_cache(_trainable_copy(base), tokenizer, noisy_rows, noprompt_cache, size.max_seq_length, device)

    records = []
    for method in methods:
        spec = dict(ALL_METHODS[method])
        clean = spec.pop("clean", False)
        overrides = {"selection_method": spec.pop("selection_method")}
        if spec.pop("base_cache", False):
            overrides["history_cache"] = base_cache
        if spec.pop("reference", False):
            overrides["reference_cache"] = reference_cache
        if spec.pop("noise_cache", False):
            overrides["reference_cache"] = noise_cache
        if spec.pop("noprompt_cache", False):
            overrides["reference_cache"] = noprompt_cache
        overrides.update(spec)
        recorder = None if clean else KeepRecorder(flags_by_key)
        signal_recorder = SignalRecorder(flags_by_key) if overrides.pop("record_signals", False) else None
        started = time.time()
        trainer = _train(base, tokenizer, clean_rows if clean else noisy_rows, size, str(work / f"{method}_s{seed}"),
                         seed, device, recorder, signal_recorder=signal_recorder, **overrides)
        train_s = time.time() - started
        model = trainer.model
        nll = _eval_nll(model, test_rows, pad_id, device)
        generations = _greedy(model, tokenizer, test_examples, size.max_new_tokens, device)
        em = [exact_match(g, ex) for g, ex in zip(generations, test_examples)]
        ans = [answer_correct(g, ex) for g, ex in zip(generations, test_examples)]
        by_task = {}
        for task in sorted({ex.task for ex in test_examples}):
            idx = [i for i, ex in enumerate(test_examples) if ex.task == task]
            by_task[task] = {"exact_match": sum(em[i] for i in idx) / len(idx),
                             "answer_accuracy": sum(ans[i] for i in idx) / len(idx)}
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        record = {
            "method": method, "seed": seed,
            "accuracy": sum(em) / len(em), "answer_accuracy": sum(ans) / len(ans), "nll": nll,
            "by_task": by_task, "wall_s": time.time() - started, "train_s": train_s,
            "config": overrides | {"clean_data": clean},
            "kept": recorder.rates() if recorder else None,
            "unmatched_batches_rows": recorder.unmatched if recorder else None,
            "final_train_loss": losses[-1] if losses else None,
            "samples": [{"prompt": ex.prompt, "reference": ex.clean_response, "output": g}
                        for ex, g in list(zip(test_examples, generations))[:3]],
            "shared_cost": shared_cost,
        }
        if signal_recorder is not None:
            record["signal_separation"] = signal_recorder.separation()
        records.append(record)
        kept = record["kept"]["all"] if record["kept"] else {}
        log(f"seed {seed} {method:15s} EM {record['accuracy']:.3f} ans {record['answer_accuracy']:.3f} "
            f"NLL {nll:.3f} kept noise {_fmt(kept.get('noise'))} clean {_fmt(kept.get('clean'))} "
            f"({record['wall_s']:.0f}s)")
        del trainer, model
    return records


def _fmt(x):
    return "-" if x is None else f"{x:.2f}"


def summarise(records: list[dict]) -> list[dict]:
    """Mean and std over seeds per method (std is the sample std; 0 with one seed)."""
    out = []
    for method in dict.fromkeys(r["method"] for r in records):
        rs = [r for r in records if r["method"] == method]

        def ms(key, rs=rs):
            vals = [r[key] for r in rs]
            return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

        row = {"method": method, "n_seeds": len(rs)}
        for key in ("accuracy", "answer_accuracy", "nll", "wall_s"):
            row[key], row[key + "_std"] = ms(key)
        for kind in ("noise", "clean", "answer", "first", "boilerplate", "wrong_fact", "corrupt"):
            vals = [r["kept"]["all"].get(kind) for r in rs if r["kept"] and r["kept"]["all"].get(kind) is not None]
            row[f"kept_{kind}"] = statistics.fmean(vals) if vals else None
            first = [r["kept"].get("first_quarter", {}).get(kind) for r in rs if r["kept"]]
            last = [r["kept"].get("last_quarter", {}).get(kind) for r in rs if r["kept"]]
            first, last = [v for v in first if v is not None], [v for v in last if v is not None]
            row[f"kept_{kind}_first_quarter"] = statistics.fmean(first) if first else None
            row[f"kept_{kind}_last_quarter"] = statistics.fmean(last) if last else None
        out.append(row)
    return out


def markdown_table(summary: list[dict]) -> str:
    def pm(row, key, digits=3):
        return f"{row[key]:.{digits}f} ± {row[key + '_std']:.{digits}f}"

    lines = ["| method | exact match | answer accuracy | clean-answer NLL | kept noise | kept clean | "
             "kept boilerplate / wrong fact / corrupt | wall s / run |",
             "|---|---|---|---|---|---|---|---|"]
    for row in summary:
        kinds = " / ".join(_fmt(row[f"kept_{k}"]) for k in ("boilerplate", "wrong_fact", "corrupt"))
        lines.append(f"| {row['method']} | {pm(row, 'accuracy')} | {pm(row, 'answer_accuracy')} | {pm(row, 'nll')} | "
                     f"{_fmt(row['kept_noise'])} | {_fmt(row['kept_clean'])} | {kinds} | "
                     f"{row['wall_s']:.0f} |")
    return "\n".join(lines)


def kept_table(summary: list[dict]) -> str:
    """Kept fraction of noise / clean response tokens, first vs last quarter of training (cold start)."""
    lines = ["| method | noise kept (first ¼ → last ¼) | clean kept (first ¼ → last ¼) | "
             "boilerplate (first ¼ → last ¼) | wrong fact | corrupt |", "|---|---|---|---|---|---|"]
    for row in summary:
        if row["kept_noise"] is None:
            continue

        def arrow(kind, row=row):
            return f"{_fmt(row[f'kept_{kind}_first_quarter'])} → {_fmt(row[f'kept_{kind}_last_quarter'])}"

        lines.append(f"| {row['method']} | {arrow('noise')} | {arrow('clean')} | {arrow('boilerplate')} | "
                     f"{arrow('wrong_fact')} | {arrow('corrupt')} |")
    return "\n".join(lines)


def plot(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in summary]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, label in ((axes[0], "accuracy", "exact match (higher is better)"),
                           (axes[1], "answer_accuracy", "answer accuracy (higher is better)"),
                           (axes[2], "nll", "clean-answer NLL (lower is better)")):
        ax.bar(range(len(names)), [r[key] for r in summary], yerr=[r[key + "_std"] for r in summary], capsize=4,
               color=["#4c72b0" if n.startswith("full") else "#dd8452" for n in names])
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right")
        ax.set_title(label)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_quality(args) -> int:
    """Entry point of the quality benchmark (args: tiny, seeds, out, methods, plot, keep_work)."""
    warnings.filterwarnings("ignore")
    for noisy in ("transformers", "datasets", "accelerate", "peft", "trl", "sstoken.training.trainer", "sstoken.selection.history"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    device = getattr(args, "device", None) or "cpu"
    kind = "tiny" if args.tiny else getattr(args, "model", None) or "small"
    size = SIZES[kind]
    methods = list(getattr(args, "methods", None) or METHODS)
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
    out = Path(args.out)
    started = time.time()

    def log(msg):
        print(f"[{time.time() - started:6.0f}s] {msg}", flush=True)

    base, tokenizer, model_name, base_info = _load(kind, log, device)
    log(f"model {model_name} loaded")
    work = Path(tempfile.mkdtemp(prefix="sstoken-quality-"))
    records = []
    try:
        for seed in args.seeds:
            records += run_seed(base, tokenizer, size, seed, methods, work, log, device)
            _write(out, args, device, size, model_name, base_info, records, started, partial=seed != args.seeds[-1])
    finally:
        if not getattr(args, "keep_work", False):
            shutil.rmtree(work, ignore_errors=True)
    summary = _write(out, args, device, size, model_name, base_info, records, started, partial=False)
    print(markdown_table(summary))
    print()
    print(kept_table(summary))
    if not args.tiny and not getattr(args, "no_plot", False):
        png = out.with_suffix(".png")
        plot(summary, png, f"quality benchmark — {model_name}, {len(args.seeds)} seeds")
        log(f"wrote {png}")
    log(f"wrote {out}")
    return 0


def _write(out: Path, args, device: str, size: Size, model_name: str, base_info: dict, records, started,
           partial: bool):
    summary = summarise(records)
    size_dict = asdict(size)
    payload = {
        "schema_version": SCHEMA_VERSION,
        "recommended": RECOMMENDED,
        "recommended_reason": RECOMMENDED_REASON,
        "command": "python benchmarks/quality.py" + (" --tiny" if args.tiny else f" --model {args.model}") +
                   ("" if device == "cpu" else f" --device {device}") +
                   " --seeds " + " ".join(map(str, args.seeds)),
        "partial": partial,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "model": model_name,
        "base_model_info": base_info | ({"architecture": ARCHS[args.model]} if not args.tiny and args.model in ARCHS
                                        else {}),
        "device": device,
        "size": size_dict,
        "noise": size.noise.as_dict(),
        "methods": {m: ALL_METHODS[m] for m in dict.fromkeys(r["method"] for r in records)},
        "total_wall_s": time.time() - started,
        "records": records,
        "summary": summary,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, payload)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/quality.py",
        description="Train every selector (and full SFT on clean and noisy data) with the same LoRA settings, "
                    "steps and seeds on generated tasks with known noise; score exact match / NLL on a clean "
                    "test set and record which tokens each selector keeps.")
    parser.add_argument("--tiny", action="store_true", help="tiny random model: checks the mechanics in ~1 min")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--model", choices=["small", "medium", "smollm2"], default="small",
                        help="small: a ~130k-parameter llama pretrained here from scratch (default, fits a 2-core CPU);"
                             " medium: a 4-layer hidden-256 llama with more data and steps (for a GPU);"
                             " smollm2: the embedded SmolLM2-135M (needs far more compute)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "quality.json"))
    parser.add_argument("--methods", nargs="+", choices=list(ALL_METHODS),
                        help="a subset of methods (default: all but the experimental x_* variants)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--keep-work", action="store_true", help="keep the caches and outputs (temp dir)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_quality(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
