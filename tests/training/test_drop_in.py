"""Drop-in: with ``selection_method: full``, SSTokenTrainer trains as stock TRL ``SFTTrainer`` does. The same raw
prompt/completion rows, model, seed and settings give the same fp32 losses at every step and the same weights at
the end, packed or not, with a LoRA adapter or without."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from sstoken.testing import tiny_lora, tiny_model, tiny_tokenizer, tiny_training_args

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

WORDS = ["paris", "rome", "oslo", "lima", "cairo", "river", "mountain", "answer", "capital", "city", "is", "the"]


def prompt_completion_rows(n: int = 12) -> list[dict]:
    """Raw rows of several lengths, so that padding and packing both matter."""
    rows = []
    for i in range(n):
        prompt = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3 + i % 4))
        completion = " " + " ".join(WORDS[(2 * i + k) % len(WORDS)] for k in range(2 + i % 5))
        rows.append({"prompt": f"Question {i}: {prompt}?", "completion": completion})
    return rows


SETTINGS = dict(max_steps=4, per_device_train_batch_size=4, learning_rate=5e-2, logging_steps=1, seed=0,
                data_seed=0, lr_scheduler_type="constant", activation_checkpointing=False, bf16=False, optim="sgd")


def train(trainer_class, config, lora: bool):
    rows = prompt_completion_rows()
    trainer = trainer_class(model=tiny_model("llama", seed=0), args=config, train_dataset=Dataset.from_list(rows),
                            processing_class=tiny_tokenizer(), peft_config=tiny_lora() if lora else None)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    weights = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    return losses, weights


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("lora", [False, True], ids=["full-ft", "lora"])
def test_full_selection_trains_as_stock_sft_trainer(tmp_path, packing, lora):
    from trl import SFTConfig, SFTTrainer

    from sstoken.training.trainer import SSTokenTrainer

    max_length = 48 if packing else None  # TRL packs rows into max_length; unpacked rows stay whole
    stock_config = SFTConfig(output_dir=str(tmp_path / "trl"), report_to="none", save_strategy="no", use_cpu=True,
                             dataloader_num_workers=0, packing=packing, max_length=max_length, **SETTINGS)
    ours_config = tiny_training_args(tmp_path / "sstoken", selection_method="full", packing=packing,
                                     max_length=max_length, **SETTINGS)
    stock_losses, stock_weights = train(SFTTrainer, stock_config, lora)
    losses, weights = train(SSTokenTrainer, ours_config, lora)

    assert len(losses) == SETTINGS["max_steps"]
    assert losses == pytest.approx(stock_losses, rel=1e-5)
    assert weights.keys() == stock_weights.keys()
    moved = 0.0
    initial = dict(tiny_model("llama", seed=0).named_parameters())
    for name, weight in stock_weights.items():
        torch.testing.assert_close(weights[name], weight, atol=1e-5, rtol=1e-4)
        base_name = name.replace("base_model.model.", "").replace(".base_layer", "")
        if base_name in initial:
            moved = max(moved, float((weight - initial[base_name].detach()).abs().max()))
    lora_moved = max((float(w.abs().max()) for n, w in weights.items() if "lora_B" in n), default=0.0)
    assert max(moved, lora_moved) > 1e-3, "training moved the weights far beyond the tolerance"
