"""Token weights in the loss: DFT (TRL's ``loss_type: dft``) alone and with every selector, and the rule that the
loss divides by the kept count of the step whatever the weights."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from sstoken.batch import TOKEN_WEIGHTS
from sstoken.errors import ConfigError
from sstoken.selection import scoring
from sstoken.selection.selectors import SELECTORS, Selector
from sstoken.testing import random_rows, tiny_model, tiny_tokenizer, tiny_trainer, tiny_training_args

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

SETTINGS = dict(max_steps=2, per_device_train_batch_size=4, learning_rate=5e-2, logging_steps=1, data_seed=0,
                activation_checkpointing=False, lr_scheduler_type="constant")


def make_rows(n=8, seed=0, weighted=False):
    """Encoded rows; ``weighted``: with token weights that vary within and across rows (every third row stored
    without any: it weighs 1)."""
    rows = random_rows([5 + i % 4 for i in range(n)], [4 + i % 5 for i in range(n)], seed)
    if weighted:
        gen = torch.Generator().manual_seed(seed + 100)
        for i, row in enumerate(rows):
            weights = (0.25 + 2.5 * torch.rand(len(row["input_ids"]), generator=gen)).tolist()
            row[TOKEN_WEIGHTS] = [] if i % 3 == 2 else weights
    return rows


def data_weights(batch_rows, length: int) -> torch.Tensor:
    """The token weights of ``batch_rows``, built from the rows alone: one row each, a row stored without weights
    weighing 1 on every token, right-padded with 0 to ``length`` (as the collator right-pads the labels)."""
    weights = torch.zeros(len(batch_rows), length)
    for i, row in enumerate(batch_rows):
        weights[i, :len(row["input_ids"])] = torch.tensor(row[TOKEN_WEIGHTS] or [1.0] * len(row["input_ids"]))
    return weights


def make_trainer(tmp_path, rows=None, peft=True, **overrides):
    return tiny_trainer(tmp_path / "out", rows or make_rows(), lora=peft, **{**SETTINGS, **overrides})


def first_batch(trainer, n=4):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def loss_grads_event(trainer, batch, num_items_in_batch=None):
    """One training-mode compute_loss + backward: (loss, {name: grad}, the selection event)."""
    events = []
    trainer.add_selection_listener(events.append)
    try:
        trainer.model.train()
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items_in_batch)
        loss.backward()
    finally:
        trainer.selection_listeners.remove(events.append)
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, (events[0] if events else None)


def trl_loss_and_grads(tmp_path, rows, loss_type, batch, num_items_in_batch=None):
    """TRL's own SFTTrainer on the same tiny model (seed 0) and batch: its loss and gradients."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path / "trl"), loss_type=loss_type, report_to="none", use_cpu=True,
                     bf16=False, activation_checkpointing=False, dataloader_num_workers=0, max_length=None)
    trainer = SFTTrainer(model=tiny_model("llama", seed=0), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tiny_tokenizer())
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=num_items_in_batch)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("loss_type", ["dft", "nll"])
@pytest.mark.parametrize("num_items_in_batch", [None, 57])
def test_full_selection_equals_trls_own_loss_on_the_same_batch(tmp_path, loss_type, num_items_in_batch):
    """selection_method full with loss_type dft (or nll) is TRL's SFTTrainer: the same loss and the same gradient
    on one batch, with the micro-batch's own count or a step count (num_items_in_batch) as the denominator."""
    rows = make_rows(4, seed=5)
    ours = make_trainer(tmp_path, rows=rows, peft=False, selection_method="full", loss_type=loss_type,
                        max_length=None)
    batch = first_batch(ours)
    loss, grads, event = loss_grads_event(ours, batch, num_items_in_batch)
    trl_loss, trl_grads = trl_loss_and_grads(tmp_path, rows, loss_type, batch, num_items_in_batch)
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    assert grads.keys() == trl_grads.keys()
    for name, grad in trl_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-4)
    assert max(float(g.abs().max()) for g in grads.values()) > 100 * 1e-6  # far above the tolerance
    if loss_type == "dft":
        assert torch.allclose(event.weights[event.keep], torch.exp(-event.signals.current_nll[event.keep]))
        assert loss.item() != pytest.approx(scoring.masked_mean(event.signals.current_nll, event.keep), rel=1e-3)
    else:
        assert event.weights is None


# sstoken's own selectors (not research ones other test modules register) that need no reference model
OWN_SELECTORS = [name for name, cls in SELECTORS.items()
                 if cls.__module__ == Selector.__module__ and not cls.needs_reference]


@pytest.mark.parametrize("method", OWN_SELECTORS)
def test_dft_weighs_the_kept_tokens_of_any_selector(tmp_path, method):
    """With a selector, DFT's weights p = exp(−NLL) apply to the kept tokens; the loss divides by their count."""
    trainer = make_trainer(tmp_path, selection_method=method, rho=0.5, loss_type="dft")
    loss, _, event = loss_grads_event(trainer, first_batch(trainer))
    nll, keep = event.signals.current_nll, event.keep
    expected = (torch.exp(-nll) * nll * keep).sum() / keep.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    if method != "full":
        assert keep.sum() < event.signals.response_mask.sum()


def test_full_logits_path_gives_the_heads_weighted_loss(tmp_path):
    """A model whose head sstoken cannot use runs on its full logits: the same weighted loss and gradient (the
    data's weights and DFT's)."""
    rows = make_rows(weighted=True)
    head = make_trainer(tmp_path / "a", rows=rows, loss_type="dft", selection_method="random", rho=0.5)
    batch = first_batch(head)
    loss, grads, event = loss_grads_event(head, batch)
    logits = make_trainer(tmp_path / "b", rows=rows, loss_type="dft", selection_method="random", rho=0.5)
    logits.full_logits_reason = "the test asks for the full logits"
    loss_full, grads_full, event_full = loss_grads_event(logits, batch)
    assert torch.equal(event.keep, event_full.keep)
    assert loss.item() == pytest.approx(loss_full.item(), rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_full[name], grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("method, loss_type, weighted", [("sstoken", "dft", False), ("full", "dft", False),
                                                          ("sstoken", "nll", True), ("full", "dft", True)])
def test_gradient_accumulation_with_weights_equals_one_big_batch(tmp_path, method, loss_type, weighted):
    """Weights leave the denominator alone: 2 micro-batches of 4 give the gradient of one batch of 8."""
    trainer = make_trainer(tmp_path, rows=make_rows(8, seed=3, weighted=weighted), selection_method=method,
                           loss_type=loss_type)
    examples = [trainer.train_dataset[i] for i in range(8)]
    batches = {"big": [trainer.data_collator(examples)],
               "small": [trainer.data_collator(examples[:4]), trainer.data_collator(examples[4:])]}
    results = {}
    for name, micro_batches in batches.items():
        trainer.model.zero_grad()
        count = trainer._get_num_items_in_batch(micro_batches, torch.device("cpu"))
        total = 0.0
        for batch in micro_batches:
            trainer.model.train()
            loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=count)
            loss.backward()
            total += loss.item()
        results[name] = total, {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()
                                if p.requires_grad}
    assert results["small"][0] == pytest.approx(results["big"][0], rel=1e-5)
    for name, grad in results["big"][1].items():
        torch.testing.assert_close(results["small"][1][name], grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("weighting", ["dft", "data"])
def test_evaluation_loss_is_the_plain_response_nll(tmp_path, weighting):
    """Weights shape training only: with DFT, or with weighted rows, the evaluation loss is the unweighted NLL."""
    settings = {"loss_type": "dft"} if weighting == "dft" else {"rows": make_rows(weighted=True)}
    trainer = make_trainer(tmp_path, selection_method="full", **settings)
    batch = first_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
    _, _, event = loss_grads_event(trainer, batch)
    assert loss.item() == pytest.approx(scoring.masked_mean(event.signals.current_nll, event.keep), rel=1e-5)


@pytest.fixture
def weighing_selector():
    """A selector, registered for the test only, that keeps every response token and weighs the first half of
    the positions 0.5."""

    class HalfOfEarlyTokens(Selector):
        name = "test_half_early"

        def select(self, signals, progress=0.0):
            return signals.response_mask.clone()

        def weights(self, signals, progress=0.0):
            w = torch.ones(signals.response_mask.shape)
            w[:, : signals.response_mask.shape[1] // 2] = 0.5
            return w

    yield HalfOfEarlyTokens
    SELECTORS.pop(HalfOfEarlyTokens.name)


@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_a_selectors_own_weights_multiply_dfts(tmp_path, weighing_selector, loss_type):
    trainer = make_trainer(tmp_path, selection_method=weighing_selector.name, loss_type=loss_type)
    loss, _, event = loss_grads_event(trainer, first_batch(trainer))
    nll, keep = event.signals.current_nll, event.keep
    own = weighing_selector().weights(event.signals)
    dft = torch.exp(-nll) if loss_type == "dft" else torch.ones_like(nll)
    assert loss.item() == pytest.approx(((own * dft * nll) * keep).sum().item() / keep.sum().item(), rel=1e-5)


def test_dft_with_label_smoothing_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="set one of them"):
        tiny_training_args(tmp_path, loss_type="dft", label_smoothing_factor=0.1)


# ----------------------------------------------------------------------------------------------- the data's weights
@pytest.mark.parametrize("loss_type", ["nll", "dft"])
@pytest.mark.parametrize("method", ["full", "sstoken", "random"])
def test_the_datas_weights_scale_the_kept_tokens(tmp_path, method, loss_type):
    """loss = Σ_kept w·NLL / kept count, w = the rows' token weights (× p = exp(−NLL) under DFT)."""
    rows = make_rows(weighted=True)
    trainer = make_trainer(tmp_path, rows=rows, selection_method=method, rho=0.5, loss_type=loss_type)
    assert type(trainer.data_collator).__name__ == "TokenWeightsCollator"
    batch = first_batch(trainer)
    loss, _, event = loss_grads_event(trainer, batch)
    nll, keep = event.signals.current_nll, event.keep
    w = data_weights(rows[:4], batch["labels"].shape[1])
    assert torch.equal(batch[TOKEN_WEIGHTS], w)
    assert set(w[2][: len(rows[2]["input_ids"])].tolist()) == {1.0}  # the row stored without weights
    dft = torch.exp(-nll) if loss_type == "dft" else torch.ones_like(nll)
    expected = (w * dft * nll * keep).sum() / keep.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() != pytest.approx(((dft * nll * keep).sum() / keep.sum()).item(), rel=1e-3)  # weights matter
    assert torch.allclose(event.weights[keep], (w * dft)[keep])


def test_raw_conversations_with_weight_fields_train_with_those_weights(tmp_path):
    """A raw dataset with row and message weights is encoded with its token weights, which reach the loss."""
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}.", "weight": 0.5 + i}],
             "weight": 2 if i % 2 else None} for i in range(4)]
    from sstoken.training.trainer import SSTokenTrainer

    trainer = SSTokenTrainer(model=tiny_model("llama"), args=tiny_training_args(tmp_path / "raw", **SETTINGS,
                                                                                 selection_method="full"),
                             train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer())
    assert trainer.train_dataset.column_names == ["input_ids", "labels", TOKEN_WEIGHTS]
    trained = [{w for w, label in zip(row[TOKEN_WEIGHTS], row["labels"]) if label != -100}
               for row in trainer.train_dataset]
    assert trained == [{0.5}, {3.0}, {2.5}, {7.0}]  # message weight × row weight (2 on odd rows)
    loss, _, event = loss_grads_event(trainer, first_batch(trainer))
    assert loss.item() == pytest.approx(
        (event.weights * event.signals.current_nll * event.keep).sum().item() / event.keep.sum().item(), rel=1e-5)


def test_a_collator_that_drops_the_weights_is_refused(tmp_path):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from sstoken.training.trainer import SSTokenTrainer

    trl_collator = DataCollatorForLanguageModeling(pad_token_id=tiny_tokenizer().pad_token_id)

    def own_collator(examples):  # a user's collator, which knows nothing of token weights
        return trl_collator([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])

    trainer = SSTokenTrainer(model=tiny_model("llama"), args=tiny_training_args(tmp_path, **SETTINGS,
                                                                                 selection_method="full"),
                             train_dataset=Dataset.from_list(make_rows(weighted=True)),
                             processing_class=tiny_tokenizer(), data_collator=own_collator)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert TOKEN_WEIGHTS not in batch
    trainer.model.train()
    with pytest.raises(ConfigError, match="drops them"):
        trainer.compute_loss(trainer.model, batch)


def test_a_stream_carries_its_weights(tmp_path):
    """A streamed dataset cannot be known to be weighted before it is read: it keeps the column (empty lists for
    unweighted rows), and the weights reach the batches."""
    from sstoken.training.trainer import SSTokenTrainer

    rows = [{"prompt": f"What is {i} plus {i}? ", "completion": f"{2 * i}.", "weight": 3 if i % 2 else None}
            for i in range(8)]
    stream = Dataset.from_list(rows).to_iterable_dataset()
    trainer = SSTokenTrainer(model=tiny_model("llama"), args=tiny_training_args(
        tmp_path, **{**SETTINGS, "per_device_train_batch_size": 2}, selection_method="full"),
        train_dataset=stream, processing_class=tiny_tokenizer())
    batch = next(iter(trainer.get_train_dataloader()))
    trained = batch["labels"] != -100
    assert set(batch[TOKEN_WEIGHTS][0][trained[0]].tolist()) == {1.0}
    assert set(batch[TOKEN_WEIGHTS][1][trained[1]].tolist()) == {3.0}
    assert trainer.train().global_step == 2


def test_weighted_evaluation_data_beside_unweighted_training_data(tmp_path):
    """Weights only in the evaluation set: training batches need none, and evaluation runs (unweighted NLL)."""
    from sstoken.training.trainer import SSTokenTrainer

    trainer = SSTokenTrainer(model=tiny_model("llama"), args=tiny_training_args(tmp_path, **SETTINGS,
                                                                                 selection_method="full"),
                             train_dataset=Dataset.from_list(make_rows()),
                             eval_dataset=Dataset.from_list(make_rows(4, seed=1, weighted=True)),
                             processing_class=tiny_tokenizer())
    assert trainer.train().global_step == SETTINGS["max_steps"]
    assert trainer.evaluate()["eval_loss"] > 0
