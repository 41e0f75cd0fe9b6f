"""Packed / padding-free batches (TRL ``packing=True`` / ``padding_free=True``) select and weigh exactly like padded ones.

Padding-free rows carry several samples one after the other, ``position_ids`` restarting at 0 for each, no
``attention_mask``, and ``labels = -100`` at every segment start (TRL's ``DataCollatorForLanguageModeling``).
The batches here are built by that collator, so the layout is TRL's own. SDPA on CPU handles them: with no
attention mask and no KV cache, transformers derives a block-diagonal mask from ``position_ids``.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from sstoken.batch import TOKEN_WEIGHTS
from sstoken.selection import scoring
from sstoken.selection.attention import segment_ids_from_position_ids
from sstoken.selection.nll_cache import NLLCache, build_nll_cache
from sstoken.testing import random_rows, tiny_model, tiny_tokenizer
from sstoken.training.config import SSTokenConfig
from sstoken.training.trainer import SSTokenTrainer

# Scoped to this module's tests (a module-level filter would silence them for the whole session).
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

ATOL = 1e-5


def make_rows(n=4, seed=3):
    """Samples of clearly different lengths; every response has >= 4 tokens so top-rho has a choice to make."""
    return random_rows([3 + 3 * i for i in range(n)], [11 - 2 * i for i in range(n)], seed)


def collate(rows, packed, pad_to_multiple_of=None):
    collator = DataCollatorForLanguageModeling(pad_token_id=tiny_tokenizer().pad_token_id, padding_free=packed,
                                               pad_to_multiple_of=pad_to_multiple_of)
    return collator([dict(r) for r in rows])


def spans(rows):
    """(start, length) of each sample inside the packed row."""
    out, start = [], 0
    for row in rows:
        out.append((start, len(row["input_ids"])))
        start += len(row["input_ids"])
    return out


def unpack(packed_values, rows):
    """Packed 1×T values → the padded B×T' layout (zeros after each sample), for comparison."""
    width = max(len(r["input_ids"]) for r in rows)
    out = torch.zeros(len(rows), width, dtype=packed_values.dtype)
    for i, (start, length) in enumerate(spans(rows)):
        out[i, :length] = packed_values[0, start:start + length]
    return out


def make_trainer(out_dir, rows, lora, history_cache=None):
    args = SSTokenConfig(output_dir=str(out_dir), use_cpu=True, report_to=[], save_strategy="no",
                         max_length=None, rho=0.5, gamma=0.5, history_cache=history_cache, disable_tqdm=True,
                         activation_checkpointing=False)
    torch.manual_seed(0)
    trainer = SSTokenTrainer(
        model=tiny_model(seed=0), args=args, train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                               task_type="CAUSAL_LM") if lora else None,
    )
    # Before any update the model equals its history (LoRA B is zero; the cache holds this very model), so REL
    # is 0 up to float noise, and min-max normalisation would stretch that noise to [0, 1]. Move the trained
    # weights as a few steps would, so that REL carries information and selection is not decided by noise.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if param.requires_grad and (not lora or "lora_B" in name):
                param.add_(torch.randn(param.shape, generator=gen) * (0.5 if lora else 0.05))
    trainer.model.train()
    return trainer


def loss_and_signals(trainer, batch):
    """compute_loss as the Trainer calls it (kept count of the step given), plus its signals, keep mask, grads."""
    events = []
    trainer.add_selection_listener(events.append)
    try:
        count = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=count)
    finally:
        trainer.selection_listeners.remove(events.append)
    (event,) = events
    trainer.model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.model.zero_grad(set_to_none=True)
    return loss.detach(), int(count), event.signals, event.keep, grads


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and far faster on a shared, busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def rows():
    return make_rows()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("cache") / "base"
    build_nll_cache(tiny_model(seed=0), tiny_tokenizer(), rows, path, max_seq_length=64, progress=False)
    return str(path)


@pytest.fixture(scope="module")
def trainers(tmp_path_factory, rows, cache_dir):
    """Built once per module (building one is the slow part); compute_loss leaves no state behind."""
    out = tmp_path_factory.mktemp("trainers")
    return {
        "online_base_lora": make_trainer(out / "lora", rows, lora=True),
        "cached_full": make_trainer(out / "full", rows, lora=False, history_cache=cache_dir),
    }


def test_collator_layout_is_what_the_trainer_expects(rows):
    packed = collate(rows, packed=True)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    segment_ids = segment_ids_from_position_ids(packed["position_ids"])
    assert segment_ids.max().item() == len(rows) - 1
    for start, _ in spans(rows):
        assert packed["position_ids"][0, start] == 0 and packed["labels"][0, start] == -100


@pytest.mark.parametrize("history", ["online_base_lora", "cached_full"])
def test_packed_batch_selects_and_weighs_like_padded_batch(trainers, rows, history):
    trainer = trainers[history]
    padded = collate(rows, packed=False)
    packed = collate(rows, packed=True, pad_to_multiple_of=16)  # trailing padding: position_ids 0, labels -100
    assert packed["input_ids"].shape[1] > sum(len(r["input_ids"]) for r in rows)

    loss_pad, count_pad, sig_pad, keep_pad, grads_pad = loss_and_signals(trainer, padded)
    loss_pk, count_pk, sig_pk, keep_pk, grads_pk = loss_and_signals(trainer, packed)

    # The same tokens are kept, ceil(rho * n) of each sample's response.
    response = scoring.response_mask_from_labels(padded["labels"])
    assert torch.equal(unpack(keep_pk, rows), keep_pad)
    expected = [scoring.keep_count(int(n), 0.5) for n in response.sum(1)]
    assert keep_pad.sum(1).tolist() == expected
    assert count_pk == count_pad == sum(expected)
    assert not keep_pk[0, sum(len(r["input_ids"]) for r in rows):].any()  # nothing kept in the padding

    # Per-sample signals agree position by position: current NLL, history NLL, context-attention share.
    for name in ("current_nll", "history_nll", "context_share"):
        got = unpack(getattr(sig_pk, name).float(), rows)
        want = getattr(sig_pad, name).float() * padded["attention_mask"]
        assert torch.allclose(got * response, want * response, atol=ATOL), name
    share = unpack(sig_pk.context_share, rows)
    assert share[response].gt(0).all() and share[response].lt(1).all()  # a real share, not a degenerate 0/1

    # Same loss and same gradient.
    assert torch.allclose(loss_pk, loss_pad, atol=ATOL)
    assert grads_pk.keys() == grads_pad.keys()
    for name in grads_pad:
        assert torch.allclose(grads_pk[name], grads_pad[name], atol=ATOL), name

    # The data is discriminating: ignoring the sample boundaries of the packed row would select differently.
    rel = sig_pk.history_nll - sig_pk.current_nll
    scores_no_boundaries = scoring.combined_score(
        scoring.minmax_normalize(rel, sig_pk.response_mask), sig_pk.context_share, 0.5)
    keep_no_boundaries = scoring.top_rho_mask(scores_no_boundaries, sig_pk.response_mask, 0.5)
    assert not torch.equal(keep_no_boundaries, keep_pk)


def test_context_share_sees_only_its_own_sample(trainers, rows):
    """A sample's share must not change when other samples are packed in front of it."""
    trainer = trainers["online_base_lora"]
    alone = loss_and_signals(trainer, collate(rows[-1:], packed=True))[2].context_share
    together = loss_and_signals(trainer, collate(rows, packed=True))[2].context_share
    start, length = spans(rows)[-1]
    assert torch.allclose(together[0, start:start + length], alone[0, :length], atol=ATOL)


def test_cache_lookup_does_not_depend_on_batch_composition(rows, cache_dir):
    cache = NLLCache.open(cache_dir)
    padded = collate(rows, packed=False)
    by_row = cache.lookup(padded["input_ids"], padded["attention_mask"].bool())
    packed = collate(rows, packed=True, pad_to_multiple_of=16)
    segments = segment_ids_from_position_ids(packed["position_ids"])
    by_packed = cache.lookup(packed["input_ids"], torch.ones_like(packed["input_ids"], dtype=torch.bool), segments)
    assert by_row.abs().sum() > 0
    assert torch.equal(unpack(by_packed, rows), by_row)
    assert not by_packed[0, sum(len(r["input_ids"]) for r in rows):].any()  # padding gets no history

    # Another composition (different order, split over two "ranks"): each sample gets the same values.
    reordered = [rows[2], rows[0]], [rows[3], rows[1]]
    for part in reordered:
        batch = collate(part, packed=True)
        values = cache.lookup(batch["input_ids"], torch.ones_like(batch["input_ids"], dtype=torch.bool),
                              segment_ids_from_position_ids(batch["position_ids"]))
        for (start, length), row in zip(spans(part), part):
            i = rows.index(row)
            assert torch.equal(values[0, start:start + length], by_row[i, :length])


def with_weights(rows: list[dict]) -> list[dict]:
    """The rows with token weights: row i's weights vary along the row (0.5 + i/2 on its second half); the last
    row is stored without (an empty list: all 1), as unweighted rows of weighted data are."""
    out = []
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        weights = [1.0] * (n // 2) + [0.5 + i / 2] * (n - n // 2)
        out.append({**row, TOKEN_WEIGHTS: [] if i == len(rows) - 1 else weights})
    return out


def test_weights_are_packed_with_the_ids_exactly_as_trl_packs_them(tmp_path):
    """Packing weighted data gives TRL's own packed ids, labels and lengths, and each packed token keeps its weight."""
    rows = make_rows(n=6, seed=5)

    def packed(data):
        args = SSTokenConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], packing=True, max_length=24,
                             shuffle_dataset=True, seed=3, activation_checkpointing=False, selection_method="full")
        return SSTokenTrainer(model=tiny_model(seed=0), args=args, train_dataset=Dataset.from_list(data),
                              processing_class=tiny_tokenizer()).train_dataset

    plain, weighted = packed(rows), packed(with_weights(rows))
    assert weighted.column_names == [*plain.column_names[:2], TOKEN_WEIGHTS, *plain.column_names[2:]]
    for name in plain.column_names:
        assert weighted[name] == plain[name], name
    expected = {tuple(r["input_ids"]): r[TOKEN_WEIGHTS] or [1.0] * len(r["input_ids"]) for r in with_weights(rows)}
    checked = 0
    for packed_row in weighted:
        start = 0
        for length in packed_row["seq_lengths"]:
            ids = tuple(packed_row["input_ids"][start:start + length])
            if ids in expected:  # a row cut at max_length is not a whole row any more
                assert packed_row[TOKEN_WEIGHTS][start:start + length] == pytest.approx(expected[ids])
                checked += 1
            start += length
    assert checked >= 4


@pytest.mark.parametrize("weighted", [False, True])
def test_end_to_end_packing_matches_padded_training(tmp_path, weighted):
    """Two optimizer steps with TRL packing (all samples in one packed row) vs. the same samples as one padded batch;
    with token weights too (padded: TRL's collator plus the weights, packed: the weights packed and concatenated)."""
    rows = make_rows(n=6, seed=5)
    if weighted:
        rows = with_weights(rows)

    def train(packed):
        args = SSTokenConfig(
            output_dir=str(tmp_path / f"out-{packed}"), use_cpu=True, report_to=[], save_strategy="no",
            disable_tqdm=True, seed=0, max_steps=2, learning_rate=1.0, lr_scheduler_type="constant",
            logging_steps=1, rho=0.5, gamma=0.5, activation_checkpointing=False,
            # Plain SGD: Adam divides by sqrt(v) + eps, which turns float-noise differences in tiny gradients (LoRA A
            # right after B left zero) into visible weight differences; SGD keeps the comparison linear.
            optim="sgd", max_grad_norm=0.0,
            # One packed row holds every sample (max_length covers them all); the padded run takes them all in
            # one batch. Each step therefore sees the same six samples in both runs.
            packing=packed, padding_free=packed, max_length=512,
            per_device_train_batch_size=1 if packed else len(rows),
        )
        torch.manual_seed(0)
        trainer = SSTokenTrainer(
            model=tiny_model(seed=0), args=args, train_dataset=Dataset.from_list(rows),
            processing_class=tiny_tokenizer(),
            peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                   task_type="CAUSAL_LM"),
        )
        batch = next(iter(trainer.get_train_dataloader()))
        assert (TOKEN_WEIGHTS in batch) == weighted
        trainer.train()
        weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return batch, weights, losses

    packed_batch, packed_weights, packed_losses = train(True)
    padded_batch, padded_weights, padded_losses = train(False)
    assert packed_batch["input_ids"].shape[0] == 1 and "position_ids" in packed_batch
    assert segment_ids_from_position_ids(packed_batch["position_ids"]).max().item() == len(rows) - 1
    assert padded_batch["input_ids"].shape[0] == len(rows)
    assert len(packed_losses) == len(padded_losses) == 2
    assert packed_losses == pytest.approx(padded_losses, abs=ATOL)
    for name, value in padded_weights.items():
        assert torch.allclose(packed_weights[name], value, atol=ATOL), name
    # Training moved the adapter (LoRA B starts at zero), so equal weights are not trivially equal.
    assert max(float(v.abs().max()) for k, v in padded_weights.items() if "lora_B" in k) > 1e-3
