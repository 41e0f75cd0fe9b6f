"""Memory of the EMA history (``history: ema``) with bf16 weights: its float32 average against one kept in bf16.

    PYTHONPATH=src nice -n 10 python benchmarks/ema_memory.py

The embedded SmolLM2-135M-Instruct in bf16, full fine-tuning and LoRA r16 on every linear layer (adapters in
bf16 too). Reports the trainable parameters, the bytes of the average as sstoken keeps it (float32), what it
would take in the weights' dtype, and the transient copy in the weights' dtype that the history forward makes.
The sizes are those of the tensors EMAHistory actually allocates. One JSON line per case.
"""

from __future__ import annotations

import json

import torch


def main() -> None:
    from peft import LoraConfig, get_peft_model

    from sstoken.models import load_model
    from sstoken.selection.history import EMAHistory

    for case in ("full", "lora-r16"):
        model = load_model(None, "bfloat16")
        if case.startswith("lora"):
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                     task_type="CAUSAL_LM"))
            for param in model.parameters():
                if param.requires_grad:
                    param.data = param.data.to(torch.bfloat16)
        ema = EMAHistory(model, 0.99)
        average = sum(t.numel() * t.element_size() for t in ema.shadow.values())
        in_weight_dtype = sum(p.numel() * p.element_size() for p in ema.params.values())
        forward_copy = sum(p.numel() * p.element_size() for name, p in ema.params.items()
                           if ema.shadow[name].dtype != p.dtype)
        print(json.dumps({"case": case, "trainable_parameters": sum(p.numel() for p in ema.params.values()),
                          "average_mib": round(average / 2**20, 1),
                          "in_weight_dtype_mib": round(in_weight_dtype / 2**20, 1),
                          "history_forward_copy_mib": round(forward_copy / 2**20, 1)}))


if __name__ == "__main__":
    main()
