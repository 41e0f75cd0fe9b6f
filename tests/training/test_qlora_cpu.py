"""QLoRA on the CPU with the real bitsandbytes (0.50 has CPU 4- and 8-bit layers with a backward pass).

A run trains its LoRA adapter on a quantized tiny Llama through sstoken's CLI and trainer, with an evaluation
between the steps: bitsandbytes repacks 4-bit weights for a gradient-less CPU kernel after an eval-mode forward,
and sstoken must keep that from silently zeroing the gradients (``keep_cpu_4bit_layers_trainable``).
"""

from __future__ import annotations

import json

import pytest
import torch
from packaging.version import Version

from sstoken.cli import main
from sstoken.errors import ConfigError
from sstoken.models import BNB_CPU_MIN_VERSION, keep_cpu_4bit_layers_trainable, load_model
from sstoken.testing import write_tiny_jsonl, write_tiny_recipe

bnb = pytest.importorskip("bitsandbytes")
pytestmark = [
    pytest.mark.skipif(Version(bnb.__version__) < Version(BNB_CPU_MIN_VERSION),
                       reason=f"bitsandbytes {bnb.__version__} has no CPU backward (needs {BNB_CPU_MIN_VERSION})"),
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning"),
]

QUANTIZATION = {"load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_compute_dtype": None, "use_bnb_nested_quant": False, "bnb_4bit_quant_storage": None}


@pytest.mark.parametrize("bits", ["load_in_4bit", "load_in_8bit"])
def test_qlora_trains_on_the_cpu_through_the_cli(tmp_path, tiny_model_dir, bits):
    out = tmp_path / "out"
    data = write_tiny_jsonl(tmp_path / "d.jsonl", n_rows=8)
    recipe = write_tiny_recipe(tmp_path / "r.yaml", model=tiny_model_dir, output_dir=str(out), data=data,
                               eval_data=data, eval_strategy="steps", eval_steps=1, logging_steps=1, max_steps=2,
                               per_device_train_batch_size=4, learning_rate=5e-2, save_strategy="no",
                               lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                               **{bits: True})
    assert main(["train", "--config", str(recipe)]) == 0
    steps = [h for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    assert [h["step"] for h in steps] == [1, 2]
    # Step 2 comes after an evaluation (eval mode, no gradient): the gradient still flows through every layer.
    assert all(h["grad_norm"] > 0 and torch.isfinite(torch.tensor(h["loss"])) for h in steps)
    from safetensors.torch import load_file

    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [name for name in adapter if "lora_B" in name]
    assert len(lora_b) == 4  # q_proj and v_proj of both layers, all trained (they start at zero)
    assert all(adapter[name].abs().sum() > 0 for name in lora_b)


def test_4bit_layers_stay_differentiable_after_an_eval_forward(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model = load_model(tiny_model_dir, quantization=QUANTIZATION, device="cpu")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(layer.weight.device.type == "cpu" for layer in layers)
    keep_cpu_4bit_layers_trainable(model)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    ids = torch.randint(3, 300, (2, 12))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if "lora_A" in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_a_4bit_model_already_repacked_for_cpu_inference_is_refused(tiny_model_dir):
    model = load_model(tiny_model_dir, quantization=QUANTIZATION, device="cpu")
    layer = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    layer.weight.quant_state.packing_format_for_cpu = True  # what bitsandbytes sets when it repacks
    with pytest.raises(ConfigError, match="was repacked by bitsandbytes for CPU inference"):
        keep_cpu_4bit_layers_trainable(model)
