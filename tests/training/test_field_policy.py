"""Every TRL SFTConfig field is honoured or refused, and TRL's logged metrics survive sstoken's loss."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig

from sstoken.errors import ConfigError
from sstoken.selection import lm_head
from sstoken.testing import (
    CHATML_TEMPLATE,
    random_rows,
    tiny_lora,
    tiny_model,
    tiny_trainer,
    tiny_training_args,
)
from sstoken.training.field_policy import REFUSED, SFT_FIELD_POLICY, policy_markdown
from sstoken.training.trainer import SSTokenTrainer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

DOCS = Path(__file__).resolve().parents[2] / "docs" / "config.md"
SETTINGS = dict(max_steps=2, per_device_train_batch_size=4, learning_rate=5e-2, logging_steps=1,
                activation_checkpointing=False, lr_scheduler_type="constant")


def make_rows(n=8, seed=0):
    return random_rows([5 + i % 4 for i in range(n)], [4 + i % 5 for i in range(n)], seed)


# ---------------------------------------------------------------------------------------------- the table
def test_every_sft_config_field_has_a_policy():
    """A field added by a TRL or transformers upgrade must be decided on (honoured or refused) before it ships."""
    missing = [f.name for f in dataclasses.fields(SFTConfig) if f.name not in SFT_FIELD_POLICY]
    assert missing == [], f"add these fields to sstoken.training.field_policy.SFT_FIELD_POLICY: {missing}"
    stale = sorted(set(SFT_FIELD_POLICY) - {f.name for f in dataclasses.fields(SFTConfig)})
    assert stale == []


def test_docs_table_is_generated_from_the_policy():
    assert policy_markdown() in DOCS.read_text(encoding="utf-8"), "regenerate docs/config.md's table"


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (dict(loss_type="dfft"), "loss_type must be 'nll' or 'dft', got 'dfft' (did you mean 'dft'?)"),
        (dict(loss_type="dft", label_smoothing_factor=0.1), "label smoothing spreads the loss"),
        (dict(completion_only_loss=False), "completion_only_loss false is not supported"),
        (dict(assistant_only_loss=False), "assistant_only_loss false is not supported"),
        (dict(dataset_text_field="content"), "dataset_text_field 'content'"),
        (dict(truncation_mode="keep_end"), "truncation_mode must be 'keep_start'"),
        (dict(label_names=["targets"]), "label_names must be unset or ['labels']"),
        (dict(use_liger_kernel=True), "use_liger_kernel needs a GPU"),  # more in tests/training/test_liger.py
        (dict(liger_kernel_config={"rms_norm": True}), "liger_kernel_config only applies with use_liger_kernel"),
        (dict(padding_free=True), "padding_free without packing"),
        (dict(chat_template_path="Qwen/Qwen3-0.6B"), "chat_template_path must be a .jinja or .j2 file"),
        (dict(chat_template_path="absent.jinja"), "chat_template_path absent.jinja does not exist"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_refused_values_fail_when_the_config_is_built(tmp_path, settings, expected):
    with pytest.raises(ConfigError, match=None) as info:
        tiny_training_args(tmp_path / "out", **settings)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_every_refused_field_has_a_refusal_test():
    tested = {"completion_only_loss", "assistant_only_loss", "dataset_text_field", "truncation_mode",
              "label_names", "use_liger_kernel", "liger_kernel_config"}
    assert {name for name, p in SFT_FIELD_POLICY.items() if p.handling == REFUSED} == tested


@pytest.mark.parametrize("settings", [dict(completion_only_loss=True), dict(completion_only_loss=None),
                                      dict(assistant_only_loss=True), dict(loss_type="chunked_nll"),
                                      dict(padding_free=True, max_length=None)])
def test_values_that_agree_with_sstoken_are_accepted(tmp_path, settings):
    config = tiny_training_args(tmp_path / "out", **settings)
    assert config.loss_type == "nll"


def messages_dataset(n=8):
    return Dataset.from_list([{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                            {"role": "assistant", "content": f"{i} plus {i} equals {2 * i}."}]}
                              for i in range(n)])


def test_assistant_only_loss_true_trains_on_raw_conversations(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    trainer = SSTokenTrainer(model=tiny_model(), args=tiny_training_args(tmp_path / "out", assistant_only_loss=True,
                                                                           **SETTINGS),
                             train_dataset=messages_dataset(), processing_class=AutoTokenizer.from_pretrained(
                                 tiny_model_dir), peft_config=tiny_lora())
    trainer.train()
    assert trainer.args.assistant_only_loss is True
    assert any(-100 in row["labels"] for row in trainer.train_dataset)


def test_model_init_kwargs_with_a_built_model_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="model_init_kwargs only applies when model is a path"):
        tiny_trainer(tmp_path / "out", make_rows(), model_init_kwargs={"dtype": "float64"}, **SETTINGS)


def test_model_init_kwargs_are_used_for_a_model_path(tmp_path, tiny_model_dir):
    trainer = SSTokenTrainer(model=tiny_model_dir, args=tiny_training_args(
        tmp_path / "out", model_init_kwargs={"dtype": "bfloat16"}, **SETTINGS), train_dataset=messages_dataset(),
        peft_config=tiny_lora())
    assert next(trainer.model.get_base_model().parameters()).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- eos / template
CUSTOM_TEMPLATE = (CHATML_TEMPLATE.replace("'<|im_start|>' + message['role']", "'<|im_start|>' + message['role'] + ':'")
                   .replace("'<|im_start|>assistant\n'", "'<|im_start|>assistant:\n'"))


def test_chat_template_and_eos_are_applied_before_the_data_is_encoded(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    template = tmp_path / "template.jinja"
    template.write_text(CUSTOM_TEMPLATE, encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    trainer = SSTokenTrainer(model=tiny_model(), args=tiny_training_args(
        tmp_path / "out", chat_template_path=str(template), eos_token="<|endoftext|>", **SETTINGS),
        train_dataset=messages_dataset(2), processing_class=tokenizer, peft_config=tiny_lora())
    trainer.save_model()
    trainer.processing_class.save_pretrained(tmp_path / "out")
    saved = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert saved.chat_template == CUSTOM_TEMPLATE and saved.eos_token == "<|endoftext|>"
    # The training rows are the saved tokenizer's rendering of the conversation (the template's ':' included).
    first = messages_dataset(1)[0]["messages"]
    rendered = saved.apply_chat_template(first, tokenize=False)
    assert "user:" in rendered
    assert trainer.train_dataset[0]["input_ids"] == saved(rendered, add_special_tokens=False)["input_ids"][
        :len(trainer.train_dataset[0]["input_ids"])]


def test_unknown_eos_token_is_refused_before_encoding(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    with pytest.raises(ConfigError, match="eos_token '<eot>' is not in the tokenizer's vocabulary"):
        SSTokenTrainer(model=tiny_model(), args=tiny_training_args(tmp_path / "out", eos_token="<eot>", **SETTINGS),
                       train_dataset=messages_dataset(2), processing_class=AutoTokenizer.from_pretrained(
                           tiny_model_dir), peft_config=tiny_lora())


# ---------------------------------------------------------------------------------------------- label smoothing
def test_label_smoothing_matches_transformers_label_smoother(tmp_path):
    """With every response token kept, the loss is transformers' smoothed cross-entropy on the full logits."""
    from transformers.trainer_pt_utils import LabelSmoother

    rows = make_rows(4)
    trainer = tiny_trainer(tmp_path / "out", rows, selection_method="full", label_smoothing_factor=0.1,
                           **{**SETTINGS, "per_device_train_batch_size": 4})
    assert trainer.full_logits_reason is not None and "label smoothing" in trainer.full_logits_reason
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    with torch.no_grad():
        outputs = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = batch["labels"].clone()
    labels[:, 0] = -100  # sstoken never scores the first token (nothing predicts it)
    expected = LabelSmoother(epsilon=0.1)(outputs, labels, shift_labels=True)
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5)


# ---------------------------------------------------------------------------------------------- TRL's metrics
def test_head_entropy_and_accuracy_match_the_full_logits():
    torch.manual_seed(0)
    model = tiny_model()
    ids = torch.randint(3, 300, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    score_mask = labels != -100
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
        lm_head.add_sstoken_head(model)
        out = model(input_ids=ids, sstoken_head=lm_head.HeadRequest(labels=labels, score_mask=score_mask, stats=True))
    rows, cols = score_mask.nonzero(as_tuple=True)
    log_probs = logits[rows, cols - 1].log_softmax(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    hits = log_probs.argmax(-1) == labels[rows, cols]
    assert torch.allclose(out.entropy_sum, entropy.sum(), rtol=1e-5)
    assert out.top1_count.item() == hits.sum().item()


def test_chunked_head_stats_equal_one_chunk():
    torch.manual_seed(0)
    hidden, weight = torch.randn(7, 8), torch.randn(50, 8)
    targets = torch.randint(0, 50, (7,))
    _, _, whole = lm_head.label_nll_and_lse(hidden, targets, weight, None, None, chunk_rows=7, stats=True)
    _, _, chunked = lm_head.label_nll_and_lse(hidden, targets, weight, None, None, chunk_rows=2, stats=True)
    assert torch.allclose(whole.entropy, chunked.entropy) and torch.equal(whole.is_top1, chunked.is_top1)


@pytest.mark.parametrize("label_smoothing_factor", [0.0, 0.1], ids=["sstoken-head", "full-logits"])
def test_trainer_logs_trl_metrics(tmp_path, label_smoothing_factor):
    rows = make_rows(8)
    trainer = tiny_trainer(tmp_path / "out", rows, label_smoothing_factor=label_smoothing_factor,
                           **{**SETTINGS, "logging_steps": 2, "max_steps": 4})
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4]
    for h in logs:
        assert 0 < h["entropy"] <= math.log(trainer.model.config.vocab_size) + 1e-4
        assert 0 <= h["mean_token_accuracy"] <= 1
    epoch_tokens = sum(len(r["input_ids"]) for r in rows)  # 2 steps of 4 rows = one epoch; padding not counted
    assert [h["num_tokens"] for h in logs] == [epoch_tokens, 2 * epoch_tokens]


def test_num_tokens_counts_every_input_token_as_trl_does(tmp_path):
    rows = make_rows(4)
    trainer = tiny_trainer(tmp_path / "out", rows, **{**SETTINGS, "max_steps": 1, "per_device_train_batch_size": 4})
    trainer.train()
    assert trainer._total_train_tokens == sum(len(r["input_ids"]) for r in rows)


# ---------------------------------------------------------------------------------------------- MoE aux loss
def tiny_moe():
    return tiny_model("mixtral", num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.02)


def test_head_returns_the_moe_aux_loss_of_the_models_own_forward():
    model = tiny_moe()
    model.config.output_router_logits = True
    ids = torch.randint(3, 300, (2, 10))
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=torch.ones_like(ids)).aux_loss
        lm_head.add_sstoken_head(model)
        ours = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                     sstoken_head=lm_head.HeadRequest(labels=labels, score_mask=labels != -100)).aux_loss
    assert theirs is not None and torch.allclose(ours, theirs)


@pytest.mark.parametrize(("coef", "enabled"), [(None, True), (0.5, True), (0.0, False)])
def test_moe_aux_loss_is_added_to_the_loss_as_trl_does(tmp_path, coef, enabled):
    trainer = tiny_trainer(tmp_path / "out", make_rows(4), model=tiny_moe(), router_aux_loss_coef=coef,
                           selection_method="random", **{**SETTINGS, "per_device_train_batch_size": 4})
    assert trainer.aux_loss_enabled is enabled and trainer.full_logits_reason is None
    assert trainer.router_aux_loss_coef == (0.02 if coef is None else coef)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    torch.manual_seed(0)
    loss = trainer.compute_loss(trainer.model, batch)
    kept = trainer.selection_snapshots  # noqa: F841 - selection ran
    if not enabled:
        assert "aux_loss" not in trainer._metrics["train"]
        return
    aux = trainer._metrics["train"]["aux_loss"][-1]
    loss_kept = trainer._metrics["train"]["loss_kept"][-1]
    assert aux > 0
    assert math.isclose(loss.item(), loss_kept + trainer.router_aux_loss_coef * aux, rel_tol=1e-4)


def test_router_aux_loss_coef_on_a_dense_model_is_refused_as_in_trl(tmp_path):
    with pytest.raises(ValueError, match="not a Mixture-of-Experts model"):
        tiny_trainer(tmp_path / "out", make_rows(4), router_aux_loss_coef=0.1, **SETTINGS)


def test_evaluation_logs_trl_metrics_too(tmp_path):
    from sstoken.testing import tiny_tokenizer

    rows = make_rows(4)
    trainer = SSTokenTrainer(model=tiny_model(), args=tiny_training_args(tmp_path / "out", **SETTINGS),
                             train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows),
                             processing_class=tiny_tokenizer(), peft_config=tiny_lora())
    metrics = trainer.evaluate()
    assert 0 < metrics["eval_entropy"] and 0 <= metrics["eval_mean_token_accuracy"] <= 1
