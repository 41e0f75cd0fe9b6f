"""End-to-end behaviour of SSTokenTrainer on tiny random models (CPU, seconds)."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from sstoken.errors import ConfigError, DataError
from sstoken.selection import scoring
from sstoken.selection.nll_cache import build_nll_cache
from sstoken.testing import (
    random_rows,
    tiny_lora,
    tiny_model,
    tiny_tokenizer,
    tiny_trainer,
    tiny_training_args,
)
from sstoken.training.trainer import SSTokenTrainer

# Scoped to this module's tests (a module-level filter would silence them for the whole session).
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def make_rows(n=16, seed=0):
    return random_rows([5 + i % 4 for i in range(n)], [4 + i % 5 for i in range(n)], seed)


# The runs of this module: a few quick steps at a high learning rate, so that weights visibly move.
SETTINGS = dict(max_steps=3, per_device_train_batch_size=4, learning_rate=5e-2, logging_steps=1, data_seed=0,
                activation_checkpointing=False, lr_scheduler_type="constant")


def make_config(tmp_path, **overrides):
    return tiny_training_args(tmp_path / "out", **{**SETTINGS, **overrides})


def make_trainer(tmp_path, rows=None, model=None, peft=True, **overrides):
    return tiny_trainer(tmp_path / "out", rows or make_rows(), model=model, lora=peft, **{**SETTINGS, **overrides})


def trainable(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def expected_kept_fraction(rows, rho):
    kept = total = 0
    for row in rows:
        n = sum(1 for i, label in enumerate(row["labels"]) if label != -100 and i > 0)
        kept += scoring.keep_count(n, rho)
        total += n
    return kept / total


@pytest.mark.parametrize("method", ["sstoken", "rel", "attn", "random", "full"])
def test_training_changes_weights_and_keeps_rho(tmp_path, method):
    rows = make_rows(8)
    trainer = make_trainer(tmp_path, rows=rows, selection_method=method, rho=0.5, max_steps=2,
                           per_device_train_batch_size=8)
    before = trainable(trainer)
    trainer.train()
    after = trainable(trainer)
    assert all(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    logs = [h for h in trainer.state.log_history if "kept_fraction" in h]
    assert logs, "kept_fraction is logged every step"
    # one batch holds the whole dataset, so each step keeps exactly sum(ceil(rho*n)) / sum(n)
    expected = 1.0 if method == "full" else expected_kept_fraction(rows, 0.5)
    for entry in logs:
        assert entry["kept_fraction"] == pytest.approx(expected)
        assert math.isfinite(entry["loss"])
        assert entry["loss_kept"] == pytest.approx(entry["loss"], rel=1e-4)
    if method in ("sstoken", "attn"):
        assert 0.0 < logs[0]["mean_attention_share"] <= 1.0
    if method in ("sstoken", "rel"):
        assert "mean_rel" in logs[0]


def select_once(trainer, batch):
    """Run one training-mode compute_loss on ``batch``; return (loss, signals, keep) the selector saw."""
    events = []
    trainer.add_selection_listener(events.append)
    try:
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, dict(batch))
    finally:
        trainer.selection_listeners.remove(events.append)
    (event,) = events
    return loss, event.signals, event.keep


def test_selection_listeners_and_part_timer_see_every_training_micro_batch(tmp_path):
    import contextlib

    timed = []

    @contextlib.contextmanager
    def part_timer(name):
        timed.append(name)
        yield

    events = []
    rows = make_rows(8)
    trainer = SSTokenTrainer(model=tiny_model("llama"), args=make_config(tmp_path, rho=0.5, max_steps=2),
                             train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer(),
                             peft_config=tiny_lora(), selection_listeners=[events.append], part_timer=part_timer)
    trainer.train()
    assert [e.step for e in events] == [1, 2]
    assert [e.progress for e in events] == [0.0, 0.5]
    for event in events:
        assert event.trainer is trainer and event.keep.shape == event.inputs["input_ids"].shape
        assert not (event.keep & ~event.signals.response_mask).any()
        assert event.signals.history_nll is not None and event.signals.context_share is not None
    assert set(timed) == {"history", "attention_share", "select", "logging"}
    assert timed.count("select") == 2
    # The snapshot listener, registered by the trainer itself, recorded both steps.
    assert [s["step"] for s in trainer.selection_snapshots] == [1, 2]


def test_selection_prefers_high_attention_tokens_at_gamma_zero(tmp_path):
    """At gamma=0 the kept tokens are exactly the top-rho by the context share of the same forward."""
    trainer = make_trainer(tmp_path, rows=make_rows(4), selection_method="attn", rho=0.5)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    _, signals, keep = select_once(trainer, batch)
    expected = scoring.top_rho_mask(signals.context_share, signals.response_mask, 0.5)
    assert torch.equal(keep, expected)
    assert not (keep & ~signals.response_mask).any()


def _loss_and_grads(trainer, batches):
    trainer.model.train()
    trainer.model.zero_grad()
    num = trainer._get_num_items_in_batch(batches, torch.device("cpu"))
    total = 0.0
    for batch in batches:
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num)
        loss.backward()
        total += loss.item()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return total, grads


@pytest.mark.parametrize("method", ["sstoken", "full", "rel"])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, method):
    """Accumulating 2 micro-batches of b equals one batch of 2b (the documented normalisation rule)."""
    rows = make_rows(8, seed=3)
    trainer = make_trainer(tmp_path, rows=rows, selection_method=method)
    examples = [trainer.train_dataset[i] for i in range(8)]
    big = trainer.data_collator(examples)
    small = [trainer.data_collator(examples[:4]), trainer.data_collator(examples[4:])]
    loss_big, grads_big = _loss_and_grads(trainer, [big])
    loss_small, grads_small = _loss_and_grads(trainer, small)
    assert loss_small == pytest.approx(loss_big, rel=1e-5)
    for name in grads_big:
        torch.testing.assert_close(grads_small[name], grads_big[name], atol=1e-6, rtol=1e-4)


def test_loss_is_mean_nll_over_kept_tokens(tmp_path):
    trainer = make_trainer(tmp_path, rows=make_rows(4), selection_method="sstoken")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    loss, signals, keep = select_once(trainer, batch)
    assert loss.item() == pytest.approx((signals.current_nll * keep).sum().item() / keep.sum().item(), rel=1e-5)


def test_history_base_online_is_zero_rel_at_start(tmp_path):
    """LoRA B starts at 0, so the base model (adapter disabled) equals the current model: REL == 0."""
    trainer = make_trainer(tmp_path, rows=make_rows(4), selection_method="rel")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    _, s, _ = select_once(trainer, batch)
    torch.testing.assert_close(s.history_nll[s.response_mask], s.current_nll[s.response_mask], atol=1e-5, rtol=0)


def test_cached_history_equals_online_history(tmp_path):
    rows = make_rows(6)
    model = tiny_model("llama")
    tokenizer = tiny_tokenizer()
    cache_dir = tmp_path / "cache"
    build_nll_cache(model, tokenizer, rows, cache_dir, max_seq_length=64, batch_size=4, progress=False)
    online = make_trainer(tmp_path, rows=rows, model=tiny_model("llama"), selection_method="rel")
    cached = make_trainer(tmp_path, rows=rows, model=tiny_model("llama"), selection_method="rel",
                          history_cache=str(cache_dir))
    batch = online.data_collator([online.train_dataset[i] for i in range(6)])
    results = [select_once(trainer, batch)[1] for trainer in (online, cached)]
    mask = results[0].response_mask
    torch.testing.assert_close(results[1].history_nll[mask], results[0].history_nll[mask], atol=1e-4, rtol=1e-4)


def test_cache_from_another_model_is_refused(tmp_path):
    rows = make_rows(4)
    cache_dir = tmp_path / "cache"
    build_nll_cache(tiny_model("llama", seed=1), tiny_tokenizer(), rows, cache_dir, 64, progress=False)
    with pytest.raises(ConfigError, match="model"):
        make_trainer(tmp_path, rows=rows, model=tiny_model("llama", seed=2), history_cache=str(cache_dir))


def test_ema_history_tracks_weights_and_resumes(tmp_path):
    rows = make_rows(16)
    cfg = dict(selection_method="sstoken", history="ema", ema_decay=0.5, max_steps=4, save_strategy="steps",
               save_steps=2, per_device_train_batch_size=4)
    full = make_trainer(tmp_path / "a", rows=rows, **cfg)
    full.train()
    live = {n: p.detach() for n, p in full.model.named_parameters() if p.requires_grad}
    shadow = full.ema.shadow
    assert full.ema.updates == 4
    # the EMA differs from the live weights and from the starting weights of lora_B (zero)
    b_names = [n for n in shadow if "lora_B" in n]
    assert any(not torch.allclose(shadow[n], live[n]) for n in b_names)
    assert any(shadow[n].abs().sum() > 0 for n in b_names)

    resumed = make_trainer(tmp_path / "a", rows=rows, **cfg)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-2"))
    for name, value in full.ema.shadow.items():
        torch.testing.assert_close(resumed.ema.shadow[name], value, atol=1e-6, rtol=1e-5)
    for name, param in resumed.model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.detach(), live[name], atol=1e-6, rtol=1e-5)


def test_attention_warmup_uses_attention_only(tmp_path):
    trainer = make_trainer(tmp_path, selection_method="sstoken", attention_warmup=0.5)
    assert trainer.selector.gamma_at(0.0) == 0.0
    assert trainer.selector.gamma_at(0.49) == 0.0
    assert trainer.selector.gamma_at(0.5) == 0.5


def test_raw_messages_dataset_is_encoded_with_assistant_only_labels(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} equals {2 * i}."}]} for i in range(8)]
    trainer = SSTokenTrainer(model=tiny_model("llama"), args=make_config(tmp_path, max_length=64),
                             train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer(),
                             peft_config=tiny_lora())
    example = trainer.train_dataset[0]
    labels = example["labels"]
    assert labels[0] == -100 and any(label != -100 for label in labels)
    trained = tiny_tokenizer().decode([t for t, label in zip(example["input_ids"], labels) if label != -100])
    assert trained.startswith("0 plus 0 equals 0.")
    trainer.train()


@pytest.mark.parametrize(("max_length", "expected_length"), [(None, 1201), (64, 64)])
def test_raw_rows_are_truncated_to_max_length_and_not_at_all_without_one(tmp_path, max_length, expected_length):
    """max_length None means no truncation in TRL; it must not become some default length here."""
    from sstoken.training.trainer import _encode_dataset

    tokenizer = tiny_tokenizer()
    completion = " ".join(["word"] * 2000)
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    row = {"prompt": "Say it: ", "completion": completion}
    encoded, _ = _encode_dataset(Dataset.from_list([row]), tokenizer, make_config(tmp_path, max_length=max_length),
                                 "train_dataset")
    full = len(tokenizer("Say it: ", add_special_tokens=False)["input_ids"]) + len(completion_ids) + 1  # + EOS
    assert len(encoded[0]["input_ids"]) == (full if max_length is None else expected_length)
    assert full > 1024


def text_rows(n=8):
    return [{"text": f"Person {i} was born in Paris in {1950 + i}."} for i in range(n)]


@pytest.mark.parametrize("settings, name", [({}, "sstoken"), ({"selection_method": "attn"}, "attn"),
                                            ({"selection_method": "rel", "attention_warmup": 0.5}, "rel")])
def test_raw_text_dataset_is_refused_when_selection_reads_the_attention_share(tmp_path, settings, name):
    with pytest.raises(ConfigError, match=rf"^train_dataset: 8 of 8 rows are plain text .*selection_method {name!r}"):
        SSTokenTrainer(model=tiny_model("llama"), args=make_config(tmp_path, max_length=64, **settings),
                       train_dataset=Dataset.from_list(text_rows()), processing_class=tiny_tokenizer(),
                       peft_config=tiny_lora())


def test_raw_text_dataset_trains_every_token_with_rel(tmp_path):
    tok = tiny_tokenizer()
    args = make_config(tmp_path, max_length=64, selection_method="rel", max_steps=1)
    trainer = SSTokenTrainer(model=tiny_model("llama"), args=args, train_dataset=Dataset.from_list(text_rows()),
                             processing_class=tok, peft_config=tiny_lora())
    example = trainer.train_dataset[0]
    assert example["labels"] == example["input_ids"]  # no context: every token is a response token, as in TRL
    assert tok.decode(example["input_ids"]) == "Person 0 was born in Paris in 1950." + tok.eos_token
    assert trainer.train().global_step == 1


def test_bad_raw_rows_are_named_by_the_argument_they_came_in(tmp_path):
    good = [{"prompt": f"q{i}? ", "completion": f"a{i}."} for i in range(4)]
    bad = [*good[:2], {"prompt": "q", "completion": ""}]

    def build(**datasets):
        return SSTokenTrainer(model=tiny_model("llama"), args=make_config(tmp_path, max_length=64),
                              processing_class=tiny_tokenizer(), peft_config=tiny_lora(),
                              **{k: Dataset.from_list(v) for k, v in datasets.items() if not isinstance(v, dict)},
                              **{k: {n: Dataset.from_list(d) for n, d in v.items()}
                                 for k, v in datasets.items() if isinstance(v, dict)})

    with pytest.raises(DataError, match=r"^train_dataset, row 2: completion: is empty"):
        build(train_dataset=bad)
    with pytest.raises(DataError, match=r"^eval_dataset, row 2: completion: is empty"):
        build(train_dataset=good, eval_dataset=bad)
    with pytest.raises(DataError, match=r"^eval_dataset\[held_out\], row 2: completion: is empty"):
        build(train_dataset=good, eval_dataset={"in_domain": good, "held_out": bad})


@pytest.mark.parametrize("bad", [dict(rho=0.0), dict(rho=1.5), dict(gamma=-0.1), dict(gamma=2.0),
                                 dict(selection_method="nope"), dict(history="future"),
                                 dict(selection_method="rho1"), dict(attention_warmup=1.0)])
def test_bad_selection_settings_fail_at_config_time(tmp_path, bad):
    with pytest.raises(ConfigError):
        make_config(tmp_path, **bad)


def test_attention_layer_out_of_range_fails_before_training(tmp_path):
    with pytest.raises(ConfigError, match="layer"):
        make_trainer(tmp_path, attention_layer=7)


def test_full_fine_tuning_with_cached_history(tmp_path):
    rows = make_rows(8)
    cache_dir = tmp_path / "cache"
    build_nll_cache(tiny_model("llama"), tiny_tokenizer(), rows, cache_dir, 64, progress=False)
    trainer = make_trainer(tmp_path, rows=rows, peft=False, history_cache=str(cache_dir), max_steps=2)
    before = trainable(trainer)
    trainer.train()
    after = trainable(trainer)
    assert sum(not torch.equal(before[n], after[n]) for n in before) > len(before) // 2


def test_full_fine_tuning_online_base_needs_cache(tmp_path):
    """Refused when the trainer is built, not inside the first step."""
    with pytest.raises(ConfigError, match="full fine-tuning .* needs history_cache.*sstoken cache"):
        make_trainer(tmp_path, rows=make_rows(4), peft=False, max_steps=1)


def test_readme_python_example_with_a_model_path(tmp_path):
    """SSTokenTrainer(model="<path>", args=SSTokenConfig(...), train_dataset=<raw messages>) as in the README."""
    from sstoken.testing import save_tiny_model

    path = save_tiny_model(tmp_path / "model")
    rows = [{"messages": [{"role": "user", "content": f"Where was person {i} born?"},
                          {"role": "assistant", "content": "In Paris."}]} for i in range(8)]
    trainer = SSTokenTrainer(model=path, args=make_config(tmp_path, max_steps=1), train_dataset=Dataset.from_list(rows),
                             peft_config=tiny_lora())
    assert any(label == -100 for label in trainer.train_dataset[0]["labels"])
    assert trainer.train().global_step == 1


def test_raw_alpaca_eval_dataset_is_encoded_like_training_data(tmp_path):
    train = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                           {"role": "assistant", "content": f"{i} plus {i} equals {2 * i}."}]} for i in range(8)]
    evaluation = [{"instruction": f"What is {i} plus {i}?", "output": f"{i} plus {i} equals {2 * i}."}
                  for i in range(4)]
    trainer = SSTokenTrainer(model=tiny_model("llama"), args=make_config(tmp_path, max_length=64),
                             train_dataset=Dataset.from_list(train), eval_dataset=Dataset.from_list(evaluation),
                             processing_class=tiny_tokenizer(), peft_config=tiny_lora())
    example = trainer.eval_dataset[0]
    trained = tiny_tokenizer().decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != -100])
    assert example["labels"][0] == -100 and trained.startswith("0 plus 0 equals 0.")
    # The evaluation loss is the mean NLL of the response tokens only.
    rows = [trainer.eval_dataset[i] for i in range(len(trainer.eval_dataset))]
    model = trainer.model.eval()
    total = count = 0.0
    with torch.no_grad():
        for row in rows:
            labels = torch.tensor([row["labels"]])
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits
            nll = scoring.token_nll(logits, labels)
            mask = scoring.response_mask_from_labels(labels)
            total += float(nll[mask].sum())
            count += int(mask.sum())
    assert trainer.evaluate()["eval_loss"] == pytest.approx(total / count, rel=1e-4)


def test_inspect_and_training_keep_the_same_tokens(tmp_path):
    """`sstoken inspect` (report.score_batch) and a training step select through the same pipeline."""
    from sstoken.batch import pad_rows
    from sstoken.report.inspector import score_batch
    from sstoken.selection.attention import ContextShareProbe
    from sstoken.selection.selectors import make_selector

    rows = make_rows(4)
    trainer = make_trainer(tmp_path, rows=rows, selection_method="sstoken", rho=0.5, gamma=0.5, max_steps=2)
    trainer.train()  # the adapter moves away from the base model, so REL is not 0
    ids, labels, attention = pad_rows(rows, pad_id=0)
    _, signals, training_keep = select_once(trainer, {"input_ids": ids, "labels": labels,
                                                      "attention_mask": attention})
    assert (signals.current_nll - signals.history_nll)[signals.response_mask].abs().max() > 0
    inspected = score_batch(trainer.model, rows, make_selector("sstoken", rho=0.5, gamma=0.5), 0.5,
                            ContextShareProbe(trainer.model), has_history_model=True, pad_id=0,
                            sstoken_head=trainer.full_logits_reason is None)
    assert torch.equal(inspected["keep"], training_keep)
    assert 0 < int(training_keep.sum()) < int(signals.response_mask.sum())


def test_a_missing_reference_cache_is_named_as_such(tmp_path):
    with pytest.raises(ConfigError, match=r"^reference cache .*missing does not exist"):
        make_trainer(tmp_path, selection_method="rho1", reference_cache=str(tmp_path / "missing"))


def test_a_selector_is_one_class_that_registers_itself(tmp_path):
    from sstoken.selection.selectors import SELECTORS, Selector, make_selector

    class LastTokensSelector(Selector):
        """Keeps the last ceil(rho*n) response tokens of each sample (a test selector)."""

        name = "last_tokens_test"

        def select(self, signals, progress=0.0):
            positions = torch.arange(signals.response_mask.shape[1], dtype=torch.float32)
            scores = positions.expand_as(signals.current_nll)
            return scoring.top_rho_mask(scores, signals.response_mask, self.rho, signals.segment_ids)

    try:
        assert SELECTORS["last_tokens_test"] is LastTokensSelector
        assert make_selector("last_tokens_test", rho=0.5).rho == 0.5
        rows = make_rows(4)
        trainer = make_trainer(tmp_path, rows=rows, selection_method="last_tokens_test", rho=0.5, max_steps=1,
                               per_device_train_batch_size=4)
        assert not trainer.selector.needs_history and not trainer.selector.needs_attention
        trainer.train()
        (entry,) = [h for h in trainer.state.log_history if "kept_fraction" in h]
        assert entry["kept_fraction"] == pytest.approx(expected_kept_fraction(rows, 0.5))
    finally:
        del SELECTORS["last_tokens_test"]


def test_a_cpu_run_does_not_ask_for_pinned_memory(tmp_path):
    """Pinned memory only helps copies to an accelerator; left on, torch warns on every CPU run."""
    import warnings

    trainer = make_trainer(tmp_path, max_steps=1)
    assert trainer.args.dataloader_pin_memory is False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "pin_memory" in str(w.message)]


def test_evaluation_that_returns_logits_runs_the_model_once_with_the_same_loss(tmp_path):
    """compute_metrics needs logits (prediction_step asks compute_loss for its outputs): the evaluation forward
    builds them itself, so the model runs once per batch, and the loss is the response NLL either way."""
    trainer = make_trainer(tmp_path)
    model = trainer.model
    model.eval()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    # Decided on first use, with a check forward of its own: before the counting starts.
    assert trainer.full_logits_reason is None
    forwards = []
    handle = model.get_base_model().model.register_forward_hook(lambda *a: forwards.append(1))
    try:
        with torch.no_grad():
            loss_only = trainer.compute_loss(model, dict(batch))
            assert len(forwards) == 1
            loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    finally:
        handle.remove()
    assert len(forwards) == 2  # one more compute_loss, one more forward
    assert torch.allclose(loss, loss_only, atol=1e-5)
    assert outputs.logits.shape[:2] == batch["input_ids"].shape
    assert outputs.logits.shape[-1] == model.config.vocab_size


def test_flash_attention_2_trains_with_the_sdpa_selection(tmp_path, flash_attention_2_standin):
    """The attention probe under FlashAttention-2 (a stand-in kernel computed by SDPA, transformers' flash path
    around it): the same loss, attention share and kept tokens as the same model under SDPA."""
    rows = make_rows(4)
    results = {}
    for name in ("sdpa", flash_attention_2_standin):
        trainer = make_trainer(tmp_path / name, rows=rows, model=tiny_model("llama", attn_implementation=name),
                               selection_method="sstoken", rho=0.5)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        assert batch["attention_mask"].eq(0).any(), "padded rows: transformers unpads them for the flash kernel"
        results[name] = select_once(trainer, batch)
        assert trainer.model.get_base_model().config._attn_implementation == name
    (loss, signals, keep), (flash_loss, flash_signals, flash_keep) = results.values()
    response = signals.response_mask
    torch.testing.assert_close(flash_signals.context_share[response], signals.context_share[response],
                               atol=1e-5, rtol=0)
    assert torch.equal(flash_keep, keep)
    assert flash_loss.item() == pytest.approx(loss.item(), rel=1e-5)


def test_attention_share_under_activation_checkpointing_is_computed_once_per_step_and_fresh(tmp_path, monkeypatch):
    """Checkpointing recomputes every layer's forward in the backward pass: the share must still be computed once a
    step (the recomputation passes straight through), and be that step's share (its batch, its weights)."""
    import sstoken.selection.attention as attention
    from sstoken.selection.signals import BatchLayout

    calls = []
    real = attention.context_share_from_qk
    monkeypatch.setattr(attention, "context_share_from_qk", lambda *a, **k: calls.append(1) or real(*a, **k))
    rows = make_rows(8)
    trainer = make_trainer(tmp_path, rows=rows, activation_checkpointing=True, max_steps=2, rho=0.5)
    checked = []

    def check(event):
        # What a fresh no-grad forward of this model, now, gives for this batch (one more share computed).
        layout = BatchLayout.of(event.inputs)
        expected = attention.context_share(trainer.model, event.inputs["input_ids"], event.inputs["attention_mask"],
                                           layout.context)
        torch.testing.assert_close(event.signals.context_share[layout.valid], expected[layout.valid], atol=1e-5,
                                   rtol=0)
        checked.append(event.signals.context_share.clone())

    trainer.add_selection_listener(check)
    trainer.train()
    assert trainer.model.is_activation_checkpointing
    assert len(checked) == 2 and not torch.equal(checked[0], checked[1])
    assert len(calls) == 2 + 2, "one share per training step, plus the check's own forward each step"


@pytest.mark.slow
def test_torch_compile_trains_as_without_it(tmp_path):
    """``torch_compile: true``: dynamo traces the patched forward, the attention probe and sstoken's head (breaking the
    graph around the selection and the head's data-dependent indexing) and the run is the one without it. Backend
    "eager" runs dynamo's tracing without generating code, in seconds; with inductor, the default, the same 3-step
    run here gave the same losses within 5e-7 (3 minutes of compiling on this CPU)."""
    runs = {}
    for compiled in (False, True):
        trainer = make_trainer(tmp_path / str(compiled), rows=make_rows(8), max_steps=2, rho=0.5,
                               torch_compile=compiled, torch_compile_backend="eager" if compiled else None)
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        runs[compiled] = ([e[key] for e in logs for key in ("loss", "mean_attention_share", "mean_rel")], trainer)
    (plain, plain_trainer), (compiled, compiled_trainer) = runs[False], runs[True]
    assert type(compiled_trainer.model_wrapped).__name__ == "OptimizedModule", "the model was compiled"
    assert len(compiled) == 2 * 3 and compiled == pytest.approx(plain, rel=1e-5, abs=1e-7)
    plain_weights, compiled_weights = trainable(plain_trainer), trainable(compiled_trainer)
    for name, weight in plain_weights.items():
        torch.testing.assert_close(compiled_weights[name], weight, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full-fine-tuning"])
def test_bf16_mixed_precision_autocast_covers_sstokens_head(tmp_path, lora):
    """With `bf16: true` and float32 weights, accelerate wraps the model's forward in autocast. sstoken's head is
    patched before that wrapping, so the training forward that runs it is autocast too (full fine-tuning used to
    run it in float32 outside the autocast), and the head check compares like with like and keeps the head."""
    trainer = make_trainer(tmp_path, peft=lora, bf16=True, max_steps=1, selection_method="attn")
    seen = []
    base = trainer.model.get_base_model() if lora else trainer.model
    base.model.layers[0].mlp.register_forward_hook(
        lambda module, args, output: seen.append((module.training, torch.is_autocast_enabled("cpu"))))
    trainer.train()
    assert trainer.full_logits_reason is None
    assert any(training for training, _ in seen) and all(autocast for training, autocast in seen if training)
