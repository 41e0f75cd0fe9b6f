"""``use_liger_kernel``: Liger's layer kernels under sstoken's own LM head.

Liger's kernels are Triton GPU kernels, so on this CPU they cannot run. What runs here is everything around
them: the refusals made before the model loads, and, where liger-kernel is installed, Liger's real patching of a
tiny Llama through transformers' Trainer (at the start of ``train()``, as on a GPU), with Liger's three Triton
autograd functions (RMSNorm, SiLU·mul, RoPE) replaced by the same maths in torch. That proves the wiring (which
layers Liger replaces, that sstoken's head and attention probe still compute the loss, that the fused
cross-entropy stays off); the kernels' own numbers are the GPU check's job (``benchmarks/gpu/check.sh``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from sstoken.errors import ConfigError
from sstoken.testing import random_rows, tiny_lora, tiny_model, tiny_tokenizer, tiny_training_args
from sstoken.training import config as config_module
from sstoken.training.trainer import SSTokenTrainer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def gpu_config(tmp_path, monkeypatch, **settings):
    """The config as it is built on a GPU machine (a GPU faked: only the checks made before the model loads run)."""
    monkeypatch.setattr(config_module, "_has_gpu", lambda: True)
    return tiny_training_args(tmp_path / "out", use_cpu=False, bf16=False, **settings)


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(("settings", "expected"), [
    (dict(liger_kernel_config={"rms_norm": True}), "liger_kernel_config only applies with use_liger_kernel: true"),
    (dict(use_liger_kernel=True, liger_kernel_config={"fused_linear_cross_entropy": True}),
     "liger_kernel_config fused_linear_cross_entropy: true is not supported"),
    (dict(use_liger_kernel=True, liger_kernel_config=["rope"]), "liger_kernel_config must be a mapping"),
    (dict(use_liger_kernel=True), "use_liger_kernel needs a GPU: Liger's kernels are Triton GPU kernels"),
])
def test_liger_settings_that_cannot_work_are_refused_before_the_model_loads(tmp_path, settings, expected):
    with pytest.raises(ConfigError) as info:
        tiny_training_args(tmp_path / "out", **settings)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_liger_without_liger_kernel_is_refused_on_a_gpu_machine(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "liger_kernel" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match="use_liger_kernel needs liger-kernel: pip install liger-kernel"):
        gpu_config(tmp_path, monkeypatch, use_liger_kernel=True)


def test_liger_older_than_trl_supports_is_refused(tmp_path, monkeypatch):
    real_find_spec, real_version = importlib.util.find_spec, importlib.metadata.version
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "liger_kernel" else real_find_spec(name, *a))
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "0.5.10" if name == "liger-kernel" else real_version(name))
    with pytest.raises(ConfigError, match=r"needs liger-kernel >= 0\.8\.2 \(installed: 0\.5\.10\)"):
        gpu_config(tmp_path, monkeypatch, use_liger_kernel=True)


def test_liger_is_accepted_on_a_gpu_machine_with_liger_kernel(tmp_path, monkeypatch):
    pytest.importorskip("liger_kernel")
    config = gpu_config(tmp_path, monkeypatch, use_liger_kernel=True, liger_kernel_config={"rope": False})
    assert config.use_liger_kernel and config.liger_kernel_config == {"rope": False}


# ---------------------------------------------------------------------------------------------- the wiring
class TorchStandIns:
    """Liger's Triton autograd functions replaced by the same maths in torch, counting their calls."""

    def __init__(self, rotary):
        self.calls = {"rms_norm": 0, "silu_mul": 0, "rope": 0}
        self.rotary = rotary  # transformers' own apply_rotary_pos_emb
        stand_ins = self

        class RMSNorm:
            @staticmethod
            def apply(hidden, weight, eps, offset, casting_mode, in_place, row_mode):
                assert casting_mode == "llama" and offset == 0.0
                stand_ins.calls["rms_norm"] += 1
                variance = hidden.float().pow(2).mean(-1, keepdim=True)
                return weight * (hidden.float() * torch.rsqrt(variance + eps)).to(hidden.dtype)

        class SiLUMul:
            @staticmethod
            def apply(gate, up, gate_multiplier=1.0, down_multiplier=1.0):
                assert gate_multiplier == down_multiplier == 1.0
                stand_ins.calls["silu_mul"] += 1
                return F.silu(gate) * up

        self.rms_norm, self.silu_mul = RMSNorm, SiLUMul

    def rope(self, q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        self.calls["rope"] += 1
        return self.rotary(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


@pytest.fixture
def liger_on_cpu(monkeypatch):
    """Liger's real patching, its Triton functions stood in for; every module-level patch Liger makes is undone."""
    pytest.importorskip("liger_kernel.transformers")  # needs triton, which imports without a GPU
    import liger_kernel.transformers.monkey_patch as liger_patch
    import liger_kernel.transformers.rms_norm as liger_rms_norm
    import liger_kernel.transformers.swiglu as liger_swiglu
    from transformers.models.llama import modeling_llama

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):  # Liger replaces these process-wide
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", torch.nn.functional.cross_entropy)
    stand_ins = TorchStandIns(modeling_llama.apply_rotary_pos_emb)
    monkeypatch.setattr(liger_rms_norm, "LigerRMSNormFunction", stand_ins.rms_norm)
    monkeypatch.setattr(liger_swiglu, "LigerSiLUMulFunction", stand_ins.silu_mul)
    monkeypatch.setattr(liger_patch, "liger_rotary_pos_emb", stand_ins.rope)
    return stand_ins


def train_tiny(tmp_path, name, liger: bool, liger_kernel_config=None):
    args = tiny_training_args(tmp_path / name, max_steps=2, per_device_train_batch_size=4, learning_rate=5e-2,
                              logging_steps=1, activation_checkpointing=False, lr_scheduler_type="constant")
    # The checks made before the model loads refuse a CPU run (tested above); switched on after them here.
    args.use_liger_kernel, args.liger_kernel_config = liger, liger_kernel_config
    rows = random_rows([5, 7, 6, 8, 5, 6, 7, 9], [6, 4, 8, 5, 7, 9, 4, 6])
    trainer = SSTokenTrainer(model=tiny_model(), args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tiny_tokenizer(), peft_config=tiny_lora())
    trainer.train()
    return trainer


def test_liger_layer_kernels_run_under_sstokens_head(tmp_path, liger_on_cpu):
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    plain = train_tiny(tmp_path, "plain", liger=False)
    assert liger_on_cpu.calls == {"rms_norm": 0, "silu_mul": 0, "rope": 0}
    liger = train_tiny(tmp_path, "liger", liger=True)

    # TRL turned Liger's fused loss off, and the Trainer applied the layer kernels when training started.
    assert liger.args.liger_kernel_config == {"fused_linear_cross_entropy": False}
    base = liger.model.get_base_model()
    layer = base.model.layers[0]
    assert layer.mlp.forward.__func__ is LigerSwiGLUMLP.forward
    assert layer.input_layernorm.forward.__func__ is base.model.norm.forward.__func__ is LigerRMSNorm.forward
    # They ran inside the training forwards (2 steps; the history pass and the training pass of each).
    calls = liger_on_cpu.calls
    assert calls["rms_norm"] > 0 and calls["silu_mul"] > 0 and calls["rope"] > 0
    # sstoken's head and attention probe still computed the loss: the model's forward is sstoken's, no fallback.
    assert liger.full_logits_reason is None and vars(base)["forward"] is base._sstoken_forward
    assert all(log["mean_attention_share"] > 0 for log in liger.state.log_history if "loss" in log)
    # Same maths in the stand-ins, so the same training as without Liger.
    losses = [[log["loss"] for log in t.state.log_history if "loss" in log] for t in (plain, liger)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for (name, p), q in zip(plain.model.named_parameters(), liger.model.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_liger_options_reach_liger(tmp_path, liger_on_cpu):
    liger = train_tiny(tmp_path, "liger", liger=True, liger_kernel_config={"swiglu": False})
    base = liger.model.get_base_model()
    assert liger_on_cpu.calls["silu_mul"] == 0 and liger_on_cpu.calls["rms_norm"] > 0
    assert "forward" not in vars(base.model.layers[0].mlp)  # the MLP kept its own forward
