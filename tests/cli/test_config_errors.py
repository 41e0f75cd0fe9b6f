"""User errors end to end: bad input files and bad configuration through ``sstoken train``.

Every case must end with exit status 2 and exactly one stderr line ``sstoken: error: ...`` (no traceback),
before any training step, leaving no checkpoint or adapter behind. Errors that do not need the model are
caught before its weights are loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

import sstoken.models
from sstoken.cli import main
from sstoken.errors import ConfigError
from sstoken.selection.attention import ContextShareProbe
from sstoken.testing import (
    random_rows,
    save_tiny_model,
    tiny_model,
    tiny_tokenizer,
    tiny_trainer,
    tiny_training_args,
    write_tiny_jsonl,
    write_tiny_recipe,
)
from sstoken.training.config import check_one_device_per_process
from sstoken.training.trainer import SSTokenTrainer

BAD = Path(__file__).resolve().parents[1] / "data" / "bad"
# The bad-input corpus and its expected outcomes are owned by tests/data/test_encoding.py; reuse the same table.
EXPECTED = json.loads((BAD / "EXPECTED.json").read_text(encoding="utf-8"))
ERROR_FILES = sorted(name for name, case in EXPECTED.items() if case["outcome"] == "error")
OK_FILES = sorted(name for name, case in EXPECTED.items() if case["outcome"] == "ok")


@pytest.fixture(scope="module")
def model_b(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "b", seed=1)


@pytest.fixture(scope="module")
def good_data(tmp_path_factory):
    return write_tiny_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", n_rows=8)


class Guard:
    """Records model loads; a training loop starting is a test failure (AssertionError escapes the CLI)."""

    def __init__(self, monkeypatch):
        self.models_loaded = 0
        real_load = sstoken.models.load_model

        def counting_load(*args, **kwargs):
            self.models_loaded += 1
            return real_load(*args, **kwargs)

        def no_training(trainer, *args, **kwargs):
            raise AssertionError("training started although the configuration is bad")

        monkeypatch.setattr(sstoken.models, "load_model", counting_load)
        monkeypatch.setattr(SSTokenTrainer, "train", no_training)


@pytest.fixture
def guard(monkeypatch):
    return Guard(monkeypatch)


def write_recipe(path: Path, **settings) -> Path:
    return write_tiny_recipe(path, **{"max_steps": 2, "save_steps": 1, **settings})


def run_cli(capsys, *argv: str) -> str:
    """Run ``sstoken`` in-process; assert exit 2 and one error line; return that line."""
    capsys.readouterr()
    status = main(list(argv))
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.count("sstoken: error: ") == 1 and "Traceback" not in err, err
    message = err[err.index("sstoken: error: "):]
    assert message.endswith("\n") and message.count("\n") == 1, err  # the last line, and only one line
    return message.rstrip("\n")


def assert_nothing_written(output_dir: Path) -> None:
    """The run stopped before writing anything a later run could mistake for a result."""
    if output_dir.exists():
        leftovers = [p.name for p in output_dir.iterdir()
                     if p.name.startswith("checkpoint-") or p.name.startswith("adapter_")
                     or p.name in ("model.safetensors", "summary.json", "trainer_state.json")]
        assert leftovers == []


# --------------------------------------------------------------------------------------------------------------
# Bad input files
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ERROR_FILES)
def test_bad_input_file_fails_with_file_and_line(name, tmp_path, tiny_model_dir, guard, capsys):
    case = EXPECTED[name]
    path = BAD / name
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=str(path), output_dir=str(out),
                          max_seq_length=case.get("max_seq_length", 512))
    line = run_cli(capsys, "train", "--config", str(recipe))
    where = f"{path}:{case['line']}: " if case["line"] is not None else f"{path}: "
    assert line.startswith("sstoken: error: " + where), line
    for part in case["contains"]:
        assert part in line
    for part in case.get("excludes", []):
        assert part not in line
    assert guard.models_loaded == 0  # data is checked before the weights load
    assert not out.exists()


@pytest.mark.parametrize("name", OK_FILES)
def test_rows_without_trainable_tokens_are_skipped_and_counted(name, tmp_path, tiny_model_dir, capsys):
    case = EXPECTED[name]
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=str(BAD / name), output_dir=str(out),
                          max_seq_length=case["max_seq_length"], max_steps=1, save_strategy="no")
    assert main(["train", "--config", str(recipe)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_used"] == case["used"]
    assert summary["rows_skipped_no_trainable_token"] == case["skipped"]


# --------------------------------------------------------------------------------------------------------------
# Bad configuration, caught before the model loads
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, expected",
    [
        (dict(rho=0), "rho must be in (0, 1], got 0"),
        (dict(rho=1.5), "rho must be in (0, 1], got 1.5"),
        (dict(rho=-0.2), "rho must be in (0, 1]"),
        (dict(rho=float("nan")), "rho must be a finite number, got nan"),
        (dict(rho="abc"), "rho must be a number, got 'abc'"),
        (dict(rho=True), "rho must be a number, got True"),
        (dict(gamma=-0.1), "gamma must be in [0, 1], got -0.1"),
        (dict(gamma=1.01), "gamma must be in [0, 1], got 1.01"),
        (dict(rhoo=0.5), "unknown config key 'rhoo' (did you mean 'rho'?)"),
        (dict(gama=0.5), "unknown config key 'gama' (did you mean 'gamma'?)"),
        # A key typed with a Greek omicron, or a Cyrillic a and e: it looks right on screen, so the hint says why.
        ({"rh\u03bf": 0.5}, "(did you mean 'rho'? 'rh\u03bf' has a look-alike character: \u03bf (U+03BF GREEK SMALL"),
        ({"g\u0430mm\u0430": 0.5}, "(did you mean 'gamma'? 'g\u0430mm\u0430' has a look-alike character: \u0430"),
        ({"Learning_Rate": 1e-4}, "unknown config key 'Learning_Rate' (did you mean 'learning_rate'?)"),
        (dict(lora={"r": 4, "alpah": 8}), "unknown lora key 'alpah' (did you mean 'alpha'?)"),
        (dict(max_steps="abc"), "max_steps must be an integer, got 'abc'"),
        (dict(learning_rate=[1]), "learning_rate must be a number, got [1]"),
        (dict(use_cpu="yes"), "use_cpu must be true or false, got 'yes'"),
        (dict(per_device_train_batch_size=0), "per_device_train_batch_size must be >= 1, got 0"),
        (dict(max_seq_length="long"), "max_seq_length must be an integer, got 'long'"),
        (dict(selection_method="best"), "selection_method 'best' is not one of"),
        (dict(selection_method="RHO1"), "(did you mean 'rho1'?)"),
        (dict(selection_method="tokenclean"), "(did you mean 'tokencleaning'?)"),
        (dict(history="EMA"), "history must be one of base, ema, got 'EMA' (did you mean 'ema'?)"),
        (dict(selection_method="rho1"), "needs reference_cache"),
        (dict(history="ema", history_cache="somewhere"), "cannot use history_cache"),
        (dict(attention_layer=2), "attention layer 2 is out of range for a model with 2 layers"),
        (dict(attention_layer=-3), "attention layer -3 is out of range for a model with 2 layers"),
        (dict(resume_from_checkpoint=True), "no complete checkpoint in"),
        (dict(resume_from_checkpoint="nowhere/checkpoint-4"), "nowhere/checkpoint-4 does not exist"),
        # Values that once trained silently wrong or failed with a traceback, often after the model loaded.
        (dict(learning_rate=float("inf")), "learning_rate must be a finite number, got inf"),
        (dict(learning_rate=float("nan")), "learning_rate must be a finite number, got nan"),
        (dict(learning_rate=-1e-4), "learning_rate must be >= 0, got -0.0001"),
        (dict(learning_rate="1e-4x"), "learning_rate must be a number, got '1e-4x'"),
        (dict(num_train_epochs=-1), "num_train_epochs must be > 0, got -1"),
        (dict(num_train_epochs=0, max_steps=-1), "num_train_epochs must be > 0, got 0"),
        (dict(max_steps=-5), "max_steps must be >= 1, or -1 to train for num_train_epochs, got -5"),
        (dict(max_steps=0), "max_steps must be >= 1, or -1"),
        (dict(max_steps=10**30), "max_steps is too large"),
        (dict(max_steps=2.5), "max_steps must be an integer, got 2.5"),
        (dict(seed=-1), "seed must be >= 0, got -1"),
        (dict(seed=2**40), "seed is too large"),
        (dict(selection_seed=-3), "selection_seed must be >= 0, got -3"),
        (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
        (dict(max_grad_norm=float("inf")), "max_grad_norm must be a finite number"),
        (dict(gradient_accumulation_steps=-2), "gradient_accumulation_steps must be >= 1"),
        (dict(save_steps=0), "save_steps must be > 0"),
        (dict(dataloader_num_workers=-1), "dataloader_num_workers must be >= 0"),
        (dict(ema_decay=float("inf"), history="ema"), "ema_decay must be a finite number"),
        (dict(dtype="float8"), "dtype must be one of auto, float32, float16, bfloat16, got 'float8'"),
        (dict(dtype="bfloat"), "(did you mean 'bfloat16'?)"),
        (dict(dtype=16), "dtype must be one of"),
        (dict(attn_implementation=["sdpa"]), "attn_implementation must be a name"),
        (dict(trust_remote_code="yes"), "trust_remote_code must be true or false, got 'yes'"),
        (dict(plots=2), "plots must be true or false, got 2"),
        (dict(cache_batch_size=0), "cache_batch_size must be from 1 to 1048576, got 0"),
        (dict(max_seq_length=10**12), "max_seq_length must be from 2 to 16777216"),
        (dict(max_seq_length=1), "max_seq_length must be from 2 to 16777216, got 1"),
        (dict(max_seq_length=True), "max_seq_length must be an integer, got True"),
        (dict(lora={"r": 4.5}), "lora r must be an integer, got 4.5"),
        (dict(lora={"r": "four"}), "lora r must be an integer, got 'four'"),
        (dict(lora={"r": 0}), "lora r must be in [1, 65536], got 0"),
        (dict(lora={"alpha": -8}), "lora alpha must be in [1, 1048576], got -8"),
        (dict(lora={"dropout": 1.5}), "lora dropout must be in [0, 1), got 1.5"),
        (dict(lora={"dropout": 1}), "lora dropout must be in [0, 1), got 1"),
        (dict(lora={"dropout": "high"}), "lora dropout must be a number, got 'high'"),
        (dict(lora={"target_modules": []}), "lora target_modules must be a module name"),
        (dict(lora={"target_modules": [1, 2]}), "lora target_modules must be a module name"),
        (dict(lora=["r", 4]), "lora must be a mapping"),
        (dict(lora=None, history="base"), "full fine-tuning (no lora) with history 'base' needs history_cache"),
        (dict(lora=None, selection_method="rel"), "full fine-tuning (no lora) with history 'base' needs"),
        (dict(data=["a.jsonl", "b.jsonl"]), "training data a.jsonl does not exist"),
        (dict(data=42), "data must be a path, a Hub dataset id, a mapping with path: or a list of them, got 42"),
        (dict(eval_data={"path": "x", "fraction": 1}), "eval_data: fraction is for the sources of a mixture"),
        (dict(eval_data="absent-eval.jsonl"), "evaluation data absent-eval.jsonl does not exist"),
        (dict(output_dir=["out"]), "output_dir must be a path (text), got ['out']"),
        (dict(output_dir=""), "output_dir must be a path (text), got ''"),
        (dict(model=3), "model must be a path (text), got 3"),
        (dict(history_cache=7), "history_cache must be a path (text), got 7"),
        (dict(reference_cache="nowhere", selection_method="rho1"), "reference_cache nowhere does not exist"),
        (dict(run_name=["a"]), "run_name must be text, got ['a']"),
        (dict(packing=True, selection_method="tokencleaning", reference_cache="r", history_cache="h"),
         "cannot run on packed sequences; set packing: false"),
        (dict(input_ids=[1, 2]), "unknown config key 'input_ids'"),
        (dict(report_to="wandbx"), "report_to 'wandbx' is not one of none, all, azure_ml"),
        (dict(report_to="tensorbord"), "(did you mean 'tensorboard'?)"),
        (dict(report_to=[1]), "report_to must be a logger name or a list of names, got [1]"),
        (dict(eval_strategy="steps", eval_steps=5), "eval_strategy steps needs eval_data"),
        (dict(attn_implementation="flex_attention"), "attn_implementation flex_attention cannot train on CPU"),
        (dict(fsdp="full_shard", fsdp_config={"version": 1}), "FSDP version 1 is not supported"),
        (dict(fsdp="full_shard", history="ema"), "history 'ema' does not support sharded parameters"),
        (dict(deepspeed={"zero_optimization": {"stage": 3}}, history="ema"),
         "history 'ema' does not support sharded parameters"),
        # transformers reads a number here as a file descriptor: open(1) would close the process's stdout.
        (dict(accelerator_config=1), "accelerator_config must be text or a mapping, got 1"),
        (dict(accelerator_config="absent.json"), "invalid training setting"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 20 else None,
)
def test_bad_setting_fails_before_the_model_loads(settings, expected, tmp_path, tiny_model_dir, good_data, guard,
                                                  capsys):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", **{"model": tiny_model_dir, "data": good_data, "output_dir": str(out),
                                                  **settings})
    line = run_cli(capsys, "train", "--config", str(recipe))
    assert expected in line
    assert guard.models_loaded == 0
    assert not out.exists()


def test_command_line_overrides_are_checked_like_the_recipe(tmp_path, tiny_model_dir, good_data, guard, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=good_data, output_dir=str(tmp_path / "out"))
    assert "rho must be a number, got 'abc'" in run_cli(capsys, "train", "--config", str(recipe), "--rho", "abc")
    line = run_cli(capsys, "train", "--config", str(recipe), "--max-step", "3")
    assert "unknown config key 'max_step' (did you mean 'max_steps'?)" in line
    assert guard.models_loaded == 0


def test_numbers_written_without_a_dot_are_read_as_numbers(tmp_path):
    """PyYAML reads 1e-4 as a string; the recipe converts it instead of failing deep in the optimizer."""
    from sstoken.cli.recipe import build_config

    path = tmp_path / "r.yaml"
    path.write_text("learning_rate: 1e-4\nmax_steps: '12'\n")
    from sstoken.cli.recipe import load_recipe, split_recipe

    _, kwargs = split_recipe(load_recipe(path))
    config = build_config({**kwargs, "output_dir": str(tmp_path / "out")})
    assert config.learning_rate == pytest.approx(1e-4) and config.max_steps == 12


@pytest.mark.parametrize(
    "text, expected",
    [
        ("rho: [0.5\nmodel: x\n", "not valid YAML"),
        ("- rho: 0.5\n- gamma: 0.5\n", "the recipe must be a mapping"),
        ("just a sentence\n", "the recipe must be a mapping"),
        (b"rho: 0.5 # caf\xe9\n", "not UTF-8"),
        ("rho: 0.5\ngamma: 0.2\nrho: 0.7\n", "key 'rho' appears twice (line 3); keep one of them"),
        ("lora:\n  r: 4\n  r: 8\n", "key 'r' appears twice (line 3)"),
        ("1: 0.5\n", "keys must be text, got 1 (line 1)"),
        ("rho: 0.5\ntrue: 1\n", "keys must be text, got True (line 2)"),
        ("lora: {2: 8}\n", "keys must be text, got 2 (line 1)"),
        ("? [a, b]\n: 1\n", "keys must be text, got a list (line 1)"),
        ("max_steps: 1" + "0" * 5000 + "\n", "not a usable recipe: a number has too many digits"),
        ("rho: " + "[" * 5000 + "\n", "not"),
    ],
    ids=["invalid-yaml", "list", "scalar", "latin-1", "duplicate-key", "duplicate-lora-key", "number-key",
         "boolean-key", "number-lora-key", "list-key", "huge-integer", "deep-nesting"],
)
def test_unreadable_recipe(text, expected, tmp_path, guard, capsys):
    path = tmp_path / "r.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    line = run_cli(capsys, "train", "--config", str(path))
    assert str(path) in line and expected in line
    assert guard.models_loaded == 0


def test_yaml_alias_bomb_gives_one_short_line(tmp_path, tiny_model_dir, good_data, guard, capsys):
    """Nine levels of nine aliases: a value of 9**9 strings that PyYAML builds cheaply (shared lists), but that
    printed in the message was hundreds of MB on one line."""
    levels = ["&l0 [" + ", ".join(['"lol"'] * 9) + "]"]
    levels += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text(f"model: {tiny_model_dir}\ndata: {good_data}\noutput_dir: {tmp_path / 'out'}\n"
                    f"learning_rate: [{', '.join(levels)}]\n")
    line = run_cli(capsys, "train", "--config", str(path))
    assert "learning_rate must be a number, got [" in line
    assert len(line) < 400
    assert guard.models_loaded == 0


def test_a_directory_device_or_huge_file_given_as_config_is_refused(tmp_path, guard, capsys):
    line = run_cli(capsys, "train", "--config", str(tmp_path))
    assert f"config {tmp_path} is a directory, not a YAML file" in line
    assert "config /dev/zero is not a regular file" in run_cli(capsys, "train", "--config", "/dev/zero")
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 200_000)
    assert "a recipe is a YAML file of at most 1048576 bytes" in run_cli(capsys, "train", "--config", str(big))
    assert guard.models_loaded == 0


def test_control_characters_in_names_are_escaped(tmp_path, tiny_model_dir, guard, capsys):
    """A file name can carry terminal escape sequences; the message shows them escaped, on one line."""
    line = run_cli(capsys, "train", "--config", str(tmp_path / "red\x1b[31m\nrecipe.yaml"))
    assert "\x1b" not in line and "red\\x1b[31m recipe.yaml does not exist" in line  # the newline: a space
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=str(tmp_path / "bell\x07.jsonl"),
                          output_dir=str(tmp_path / "out"))
    line = run_cli(capsys, "train", "--config", str(recipe))
    assert "\x07" not in line and "bell\\x07.jsonl does not exist" in line


def test_huge_integer_on_the_command_line(tmp_path, tiny_model_dir, good_data, guard, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=good_data, output_dir=str(tmp_path / "out"))
    line = run_cli(capsys, "train", "--config", str(recipe), "--max_steps", "9" * 5000)
    assert "--max_steps: '99999" in line and "has too many digits to be a number" in line and len(line) < 400
    line = run_cli(capsys, "train", "--config", str(recipe), "--max_steps", "9" * 40)
    assert "max_steps is too large" in line


def test_home_is_expanded_in_every_path(tmp_path, tiny_model_dir, good_data, guard, capsys, monkeypatch):
    """`~` was expanded by transformers in output_dir only; data and caches took it literally."""
    from sstoken.cli.recipe import load_recipe, split_recipe

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "train.jsonl").write_text(Path(good_data).read_text())
    path = tmp_path / "sub" / "r.yaml"
    path.parent.mkdir()
    write_recipe(path, model=tiny_model_dir, data="~/train.jsonl", eval_data="~/train.jsonl", output_dir="~/out",
                 history_cache="~/nll")
    run, config = split_recipe(load_recipe(path))
    assert run["data"] == run["eval_data"] == str(tmp_path / "train.jsonl")
    assert config["output_dir"] == str(tmp_path / "out") and config["history_cache"] == str(tmp_path / "nll")
    line = run_cli(capsys, "train", "--config", str(path))
    assert f"history_cache {tmp_path / 'nll'} does not exist" in line
    assert guard.models_loaded == 0


def test_missing_files(tmp_path, tiny_model_dir, good_data, guard, capsys):
    assert "does not exist" in run_cli(capsys, "train", "--config", str(tmp_path / "absent.yaml"))
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=str(tmp_path / "absent.jsonl"),
                          output_dir=str(tmp_path / "out"))
    assert f"training data {tmp_path / 'absent.jsonl'} does not exist" in run_cli(capsys, "train", "--config",
                                                                                  str(recipe))
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, output_dir=str(tmp_path / "out"))
    assert "no training data" in run_cli(capsys, "train", "--config", str(recipe))
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=good_data, output_dir=str(tmp_path / "out"),
                          history_cache=str(tmp_path / "no-cache"))
    assert "history_cache" in run_cli(capsys, "train", "--config", str(recipe))
    recipe = write_recipe(tmp_path / "r.yaml", model=str(tmp_path / "no-model"), data=good_data,
                          output_dir=str(tmp_path / "out"))
    assert "no-model" in run_cli(capsys, "train", "--config", str(recipe))
    assert guard.models_loaded == 0
    assert not (tmp_path / "out").exists()


def test_incomplete_checkpoint_named_explicitly_is_refused(tmp_path, tiny_model_dir, good_data, guard, capsys):
    half = tmp_path / "out" / "checkpoint-6"
    half.mkdir(parents=True)
    (half / "adapter_model.safetensors").write_bytes(b"")
    (half / "trainer_state.json").write_text('{"global_step": 6, "log_hist')  # cut off mid-write
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=good_data, output_dir=str(tmp_path / "out"),
                          resume_from_checkpoint=str(half))
    assert "is incomplete" in run_cli(capsys, "train", "--config", str(recipe))
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=good_data, output_dir=str(tmp_path / "out"),
                          resume_from_checkpoint=True)
    assert "no complete checkpoint" in run_cli(capsys, "train", "--config", str(recipe))
    assert guard.models_loaded == 0


def test_several_gpus_in_one_process_are_refused_before_the_model_loads(tmp_path, tiny_model_dir, good_data, guard,
                                                                        capsys, monkeypatch):
    """With several GPUs and no launcher, transformers' Trainer wraps the model in nn.DataParallel, whose replicas
    would share the attention probe's capture and the head's request. Faked here: two GPUs seen by the process."""
    from transformers import TrainingArguments

    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=good_data, output_dir=str(out))
    line = run_cli(capsys, "train", "--config", str(recipe))
    assert "2 GPUs are visible to one process" in line and "accelerate launch" in line and "torchrun" in line
    assert guard.models_loaded == 0 and not out.exists()
    model = tiny_model()
    with pytest.raises(ConfigError, match="nn.DataParallel"):  # the library: before TRL and the Trainer wrap it
        tiny_trainer(tmp_path / "lib", random_rows([4], [4]), model=model)
    # A model placed by a device map is one model-parallel model to the Trainer, not DataParallel replicas.
    model.hf_device_map = {"model": 0, "lm_head": 1}
    check_one_device_per_process(tiny_training_args(tmp_path / "lib"), model)
    check_one_device_per_process(tiny_training_args(tmp_path / "lib", model_init_kwargs={"device_map": "auto"}))


def test_attention_kernel_that_is_not_installed(tmp_path, tiny_model_dir, good_data, guard, capsys):
    """transformers raises ImportError while loading the model: one line, before training."""
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here")
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=good_data, output_dir=str(tmp_path / "out"),
                          attn_implementation="flash_attention_2")
    line = run_cli(capsys, "train", "--config", str(recipe))
    assert "cannot load model" in line and "FlashAttention2" in line
    assert_nothing_written(tmp_path / "out")


def test_foreign_output_folder_is_refused_and_left_untouched(tmp_path, tiny_model_dir, good_data, guard, capsys,
                                                             monkeypatch):
    """`output_dir: .` once overwrote the user's README.md with the model card."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("my project\n")
    (project / "notes.txt").write_text("mine\n")
    (project / "checkpoint-old").mkdir()  # not a checkpoint-N of an earlier run
    monkeypatch.chdir(project)
    for output_dir in (".", str(project)):
        recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=good_data, output_dir=output_dir)
        line = run_cli(capsys, "train", "--config", str(recipe))
        assert "is not empty and is not an earlier sstoken result" in line
        assert "(it holds README.md, checkpoint-old, notes.txt)" in line
        assert "choose a new or empty folder" in line
    assert sorted(p.name for p in project.iterdir()) == ["README.md", "checkpoint-old", "notes.txt"]
    assert (project / "README.md").read_text() == "my project\n"
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=good_data,
                          output_dir=str(project / "notes.txt"))
    assert f"output_dir {project / 'notes.txt'} is a file" in run_cli(capsys, "train", "--config", str(recipe))
    assert guard.models_loaded == 0


@pytest.mark.parametrize("marker", ["summary.json", "checkpoint-2", "adapter_model.safetensors"])
def test_earlier_run_folder_is_accepted(marker, tmp_path, tiny_model_dir, good_data, guard):
    out = tmp_path / "out"
    out.mkdir()
    if marker.startswith("checkpoint-"):
        (out / marker).mkdir()
    else:
        (out / marker).write_text("{}")
    (out / "README.md").write_text("model card of the earlier run\n")
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=good_data, output_dir=str(out))
    with pytest.raises(AssertionError, match="training started"):  # the guard: every check passed
        main(["train", "--config", str(recipe)])


def test_resume_folder_without_weights_is_refused(tmp_path, tiny_model_dir, good_data, guard, capsys):
    folder = tmp_path / "out" / "checkpoint-4"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text('{"global_step": 4}')
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=good_data, output_dir=str(tmp_path / "out"),
                          resume_from_checkpoint=str(folder))
    assert "is incomplete (no adapter or model weights)" in run_cli(capsys, "train", "--config", str(recipe))
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=good_data, output_dir=str(tmp_path / "out"),
                          resume_from_checkpoint=True)
    assert "no complete checkpoint" in run_cli(capsys, "train", "--config", str(recipe))
    assert guard.models_loaded == 0


def test_cache_command_checks_its_paths_before_loading(tmp_path, tiny_model_dir, good_data, guard, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=good_data,
                          history_cache=str(tmp_path / "nll"))
    line = run_cli(capsys, "cache", "--config", str(recipe), "--adapter", str(tmp_path / "no-adapter"))
    assert f"--adapter {tmp_path / 'no-adapter'} is not a PEFT adapter folder" in line
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.csv").write_text("1,2\n")
    line = run_cli(capsys, "cache", "--config", str(recipe), "--out", str(tmp_path / "mine"))
    assert "cache folder" in line and "is not empty and is not an earlier sstoken result" in line
    line = run_cli(capsys, "cache", "--config", str(recipe), "--out", str(tmp_path / "mine" / "data.csv"))
    assert "is a file" in line
    assert guard.models_loaded == 0
    assert (tmp_path / "mine" / "data.csv").read_text() == "1,2\n"


# --------------------------------------------------------------------------------------------------------------
# History caches that do not belong to this run
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_of_a(tmp_path_factory, tiny_model_dir, good_data):
    """`sstoken cache` with model A on the good data."""
    folder = tmp_path_factory.mktemp("cache")
    recipe = write_recipe(folder / "r.yaml", model=tiny_model_dir, data=good_data, history_cache=str(folder / "nll"))
    assert main(["cache", "--config", str(recipe)]) == 0
    return str(folder / "nll")


def test_cache_of_another_model_is_refused_before_training(tmp_path, model_b, good_data, cache_of_a, guard, capsys):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", model=model_b, data=good_data, output_dir=str(out),
                          history_cache=cache_of_a)
    line = run_cli(capsys, "train", "--config", str(recipe))
    assert "built for a different model" in line and "sstoken cache" in line
    assert guard.models_loaded == 1  # the fingerprint needs the weights; training never starts
    assert_nothing_written(out)


def test_cache_of_other_data_is_refused_before_the_model_loads(tmp_path, tiny_model_dir, cache_of_a, guard, capsys):
    other = write_tiny_jsonl(tmp_path / "other.jsonl", n_rows=8, seed=5)
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=other, output_dir=str(out),
                          history_cache=cache_of_a)
    line = run_cli(capsys, "train", "--config", str(recipe))
    assert "built for different data" in line and "of 8 training samples are not in it" in line
    assert guard.models_loaded == 0
    assert not out.exists()


# --------------------------------------------------------------------------------------------------------------
# Models whose attention cannot be hooked
# --------------------------------------------------------------------------------------------------------------


class TinyLegacyConfig(PreTrainedConfig):
    model_type = "sstoken_test_legacy"

    def __init__(self, num_hidden_layers=2, hidden_size=8, with_layer_idx=True, **kwargs):
        self.num_hidden_layers = num_hidden_layers
        self.hidden_size = hidden_size
        self.with_layer_idx = with_layer_idx
        super().__init__(**kwargs)


class LegacyAttention(nn.Module):
    """Computes attention itself instead of going through transformers' attention-function registry."""

    def __init__(self, config, layer_idx):
        super().__init__()
        if config.with_layer_idx:
            self.layer_idx = layer_idx
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)

    def forward(self, hidden):
        q, k, v = self.qkv(hidden).chunk(3, dim=-1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


class TinyLegacyModel(PreTrainedModel):
    config_class = TinyLegacyConfig

    def __init__(self, config):
        super().__init__(config)
        self.layers = nn.ModuleList(LegacyAttention(config, i) for i in range(config.num_hidden_layers))
        self.post_init()


@pytest.mark.parametrize(
    "with_layer_idx, expected",
    [(False, "has no attention module with layer_idx=1"), (True, "does not use transformers' AttentionInterface")],
)
def test_probe_refuses_models_it_cannot_hook(with_layer_idx, expected):
    model = TinyLegacyModel(TinyLegacyConfig(with_layer_idx=with_layer_idx))
    with pytest.raises(ConfigError, match="cannot hook"):
        ContextShareProbe(model, layer=-1)
    with pytest.raises(ConfigError) as info:
        ContextShareProbe(model, layer=-1)
    assert expected in str(info.value)


@pytest.fixture(scope="module")
def mamba_dir(tmp_path_factory):
    """A tiny state-space model: no attention at all."""
    from transformers import MambaConfig, MambaForCausalLM

    tok = tiny_tokenizer()
    config = MambaConfig(vocab_size=len(tok), hidden_size=16, state_size=4, num_hidden_layers=2, expand=2,
                         conv_kernel=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None)
    folder = tmp_path_factory.mktemp("mamba")
    torch.manual_seed(0)
    MambaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_model_without_attention_is_refused_before_training(tmp_path, mamba_dir, good_data, guard, capsys):
    out = tmp_path / "out"
    settings = dict(model=mamba_dir, data=good_data, output_dir=str(out), attn_implementation="eager")
    # Full fine-tuning with attention-only selection (no history needed) reaches the attention probe.
    recipe = write_recipe(tmp_path / "r.yaml", lora=None, selection_method="attn", **settings)
    line = run_cli(capsys, "train", "--config", str(recipe))
    assert "layer 1 of MambaForCausalLM is 'linear_attention', whose attention share sstoken does not compute" in line
    assert "this model has none" in line
    # With LoRA on every linear layer, PEFT refuses Mamba's out_proj first: still one line, naming lora.
    recipe = write_recipe(tmp_path / "r.yaml", lora={"r": 4}, **settings)
    line = run_cli(capsys, "train", "--config", str(recipe))
    assert line.startswith("sstoken: error: lora: ") and "out_proj" in line
    assert guard.models_loaded == 2
    assert_nothing_written(out)


def test_message_helpers_bound_escape_and_suggest_only_close_words():
    from sstoken.errors import MAX_MESSAGE_CHARS, did_you_mean, one_line, shown

    assert len(one_line("x" * 10**6)) == MAX_MESSAGE_CHARS and one_line("x" * 10**6).endswith("...")
    assert one_line("a\nb\x1b[2J\u202e") == "a b\\x1b[2J\\u202e"
    assert shown(10**5000) == "<an integer of about 5000 digits>"
    assert len(shown(["y" * 10**6] * 10**3)) <= 200
    assert did_you_mean("input_ids", ["input", "instruction"]) == ""  # pre-tokenized data is not `input`
    assert did_you_mean("Assistant", ["assistant"]) == " (did you mean 'assistant'?)"
    assert did_you_mean("rhoo", ["rho", "gamma"]) == " (did you mean 'rho'?)"
