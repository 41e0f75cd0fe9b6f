"""TrlParser-style flags, TRL's LoRA names and QLoRA keys: parsed, checked before the model loads,
and wired into PEFT / transformers as TRL wires them (bitsandbytes and a GPU simulated)."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
import torch

import sstoken.models
from sstoken.cli import main
from sstoken.cli.common import lora_config
from sstoken.cli.recipe import merge_overrides, parse_overrides, split_recipe
from sstoken.errors import ConfigError
from sstoken.testing import tiny_model, write_tiny_jsonl, write_tiny_recipe


# ---------------------------------------------------------------------------------------------- flags
def test_list_flags_take_several_values():
    assert parse_overrides(["--report_to", "wandb", "tensorboard", "--lora_target_modules", "q_proj", "v_proj",
                            "--lora_r", "8", "--bf16"]) == {
        "report_to": ["wandb", "tensorboard"], "lora_target_modules": ["q_proj", "v_proj"], "lora_r": 8,
        "bf16": True}


def test_equals_form_negative_numbers_and_the_last_value_wins():
    assert parse_overrides(["--lora_alpha=16", "--attention_layer", "-1", "--lora-dropout=0.1", "--rho", "0.5",
                            "--rho=0.6"]) == {"lora_alpha": 16, "attention_layer": -1, "lora_dropout": 0.1, "rho": 0.6}


def test_values_keep_their_dashes():
    """Only the flag name's dashes become underscores."""
    assert parse_overrides(["--model=Qwen/Qwen2.5-0.5B", "--output-dir=runs/my-run", "--max-steps", "3"]) == {
        "model": "Qwen/Qwen2.5-0.5B", "output_dir": "runs/my-run", "max_steps": 3}


def test_scheduler_kwargs_in_exponent_form_are_numbers_and_other_text_stays_text(tmp_path):
    """YAML 1.1 reads `1e-6` as text. The scheduler's keyword arguments are numbers, so they are converted (it
    failed with a TypeError in the scheduler); text of that shape elsewhere (a revision `1234e56`, a run name
    `12e4`) stays text."""
    from sstoken.cli.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("lr_scheduler_kwargs: {min_lr: 1e-6, num_cycles: 2}\nlearning_rate: 2E-4\nrun_name: 12e4\n"
                    "model_init_kwargs: {revision: 1234e56}\nmodel: m\n")
    from sstoken.cli.recipe import check_value_types

    _, config = split_recipe(merge_overrides(load_recipe(path), parse_overrides(["--weight_decay=5e-2"])))
    config = check_value_types(config)
    assert config["lr_scheduler_kwargs"] == {"min_lr": 1e-6, "num_cycles": 2}
    assert config["learning_rate"] == 2e-4 and config["weight_decay"] == 0.05
    assert config["run_name"] == "12e4" and config["model_init_kwargs"] == {"revision": "1234e56"}


def test_use_peft_false_with_a_lora_section_is_refused():
    with pytest.raises(ConfigError, match="use_peft is false but a lora section is given"):
        split_recipe({"use_peft": False, "lora": {"r": 4}})


@pytest.mark.parametrize(("targets", "expected"), [
    ("q_proj", ["q_proj"]),  # PEFT would read a bare string as a regex over full paths and match nothing
    ("all-linear", "all-linear"),
    (r".*\.(q|v)_proj", r".*\.(q|v)_proj"),
    (["q_proj", "v_proj"], ["q_proj", "v_proj"]),
])
def test_one_target_module_name_is_a_list_and_regexes_stay_strings(targets, expected):
    assert split_recipe({"lora": {"target_modules": targets}})[0]["lora"]["target_modules"] == expected


def test_use_peft_true_with_lora_null_is_refused():
    with pytest.raises(ConfigError, match="use_peft is true but lora is null"):
        split_recipe(merge_overrides({"lora": None}, parse_overrides(["--use_peft"])))


@pytest.mark.parametrize(("tokens", "expected"), [
    (["--max_steps", "10", "20"], "--max_steps takes one value, got 2: '10 20'"),
    (["--lora_r", "8", "16"], "--lora_r takes one value"),
])
def test_scalar_flags_refuse_several_values(tokens, expected):
    with pytest.raises(ConfigError) as info:
        parse_overrides(tokens)
    assert expected in str(info.value)


def test_unknown_flag_with_several_values_still_suggests_the_right_name():
    recipe = merge_overrides({}, parse_overrides(["--lora_target_module", "q_proj", "v_proj"]))
    with pytest.raises(ConfigError, match="did you mean 'lora_target_modules'"):
        split_recipe(recipe)


# ---------------------------------------------------------------------------------------------- LoRA names
def test_trl_lora_names_fill_the_lora_section():
    run, _ = split_recipe({"lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_target_modules": ["q_proj"],
                           "lora_modules_to_save": "lm_head", "use_rslora": True, "use_dora": True})
    assert run["lora"] == {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj"],
                           "target_parameters": None, "modules_to_save": ["lm_head"], "use_rslora": True,
                           "use_dora": True, "task_type": "CAUSAL_LM"}
    config = lora_config(run["lora"])
    assert (config.r, config.lora_alpha, config.use_rslora, config.use_dora) == (8, 16, True, True)
    assert set(config.target_modules) == {"q_proj"} and set(config.modules_to_save) == {"lm_head"}


def test_a_flag_in_trl_spelling_overrides_the_recipe_section():
    recipe = merge_overrides({"lora": {"r": 4, "alpha": 8}}, parse_overrides(["--lora_r", "8"]))
    run, _ = split_recipe(recipe)
    assert (run["lora"]["r"], run["lora"]["alpha"]) == (8, 8)


@pytest.mark.parametrize(("recipe", "expected"), [
    ({"lora": {"r": 4}, "lora_r": 8}, "lora r and lora_r are the same setting"),
    ({"use_peft": False, "lora_r": 8}, "lora_r is set but use_peft is false"),
    ({"lora": None, "lora_alpha": 8}, "lora_alpha is set but lora is null"),
    ({"use_peft": "yes"}, "use_peft must be true or false"),
    ({"lora_task_type": "SEQ_CLS"}, "lora task_type must be CAUSAL_LM"),
    ({"use_dora": 1}, "lora use_dora must be true or false"),
    ({"lora_modules_to_save": [3]}, "lora modules_to_save must be a name or a list of names"),
    ({"lora": {"rank": 4}}, "unknown lora key 'rank'"),
])
def test_lora_mistakes_are_refused(recipe, expected):
    with pytest.raises(ConfigError) as info:
        split_recipe(recipe)
    assert expected in str(info.value)


def test_use_peft_false_is_full_fine_tuning():
    run, _ = split_recipe({"use_peft": False})
    assert run["lora"] is None


# ---------------------------------------------------------------------------------------------- QLoRA
@pytest.mark.parametrize(("recipe", "expected"), [
    ({"load_in_4bit": True, "lora": None}, "load_in_4bit needs LoRA (QLoRA)"),
    ({"load_in_8bit": True, "use_peft": False}, "load_in_8bit needs LoRA (QLoRA)"),
    ({"load_in_4bit": True, "load_in_8bit": True}, "load_in_4bit and load_in_8bit are both set"),
    ({"bnb_4bit_quant_type": "fp4"}, "bnb_4bit_quant_type only applies with load_in_4bit: true"),
    ({"load_in_8bit": True, "use_bnb_nested_quant": True}, "use_bnb_nested_quant only applies with load_in_4bit"),
    ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf8"}, "bnb_4bit_quant_type must be one of nf4, fp4"),
    ({"load_in_4bit": True, "bnb_4bit_compute_dtype": "bf16"}, "bnb_4bit_compute_dtype must be one of"),
    ({"load_in_4bit": "yes"}, "load_in_4bit must be true or false"),
    ({"model_init_kwargs": {"quantization_config": {}}}, "set it with the recipe key load_in_4bit / load_in_8bit"),
    ({"model_init_kwargs": {"dtype": "float16"}}, "model_init_kwargs dtype: set it with the recipe key dtype"),
])
def test_quantization_mistakes_are_refused(recipe, expected):
    with pytest.raises(ConfigError) as info:
        split_recipe(recipe)
    assert expected in str(info.value)


class FakeLoad:
    """AutoModelForCausalLM.from_pretrained recorded, a tiny model back; prepare_model_for_kbit_training, which TRL's
    SFT path does not call, recorded if it ever is."""

    def __init__(self, monkeypatch, bitsandbytes="0.50.2", cuda=True):
        from transformers import AutoModelForCausalLM

        self.kwargs, self.prepared = None, []
        real_find_spec, real_version = importlib.util.find_spec, importlib.metadata.version
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (object() if bitsandbytes else None)
                            if name == "bitsandbytes" else real_find_spec(name, *a))
        monkeypatch.setattr(importlib.metadata, "version",
                            lambda name: bitsandbytes if name == "bitsandbytes" else real_version(name))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        real_device_map = sstoken.models.kbit_device_map
        monkeypatch.setattr(sstoken.models, "kbit_device_map",
                            lambda device: {"": 0} if device == "cuda" else real_device_map(device))

        def from_pretrained(path, **kwargs):
            self.kwargs = kwargs
            return tiny_model()

        def prepare(model, use_gradient_checkpointing=True, **kwargs):
            self.prepared.append(use_gradient_checkpointing)
            return model

        monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
        import peft

        monkeypatch.setattr(peft, "prepare_model_for_kbit_training", prepare)


def quantization_of(**recipe):
    run, _ = split_recipe({"lora": {"r": 4}, **recipe})
    return run["quantization"]


def test_4bit_settings_reach_from_pretrained_as_a_bitsandbytes_config(monkeypatch):
    fake = FakeLoad(monkeypatch)
    quantization = quantization_of(load_in_4bit=True, bnb_4bit_quant_type="fp4", use_bnb_nested_quant=True)
    sstoken.models.load_model("some/model", "float16", quantization=quantization,
                              extra_kwargs={"revision": "abc"})
    config = fake.kwargs["quantization_config"]
    assert config.load_in_4bit and not config.load_in_8bit
    assert (config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant) == ("fp4", True)
    assert config.bnb_4bit_compute_dtype == torch.float16  # the model's dtype, as in TRL
    assert fake.kwargs["device_map"] == {"": 0} and fake.kwargs["revision"] == "abc"
    assert fake.prepared == []


def test_8bit_and_the_default_compute_dtype(monkeypatch):
    fake = FakeLoad(monkeypatch)
    sstoken.models.load_model("some/model", quantization=quantization_of(load_in_8bit=True))
    assert fake.kwargs["quantization_config"].load_in_8bit and fake.prepared == []
    assert sstoken.models.bnb_config(quantization_of(load_in_4bit=True)).bnb_4bit_compute_dtype == torch.bfloat16


def test_no_quantization_means_no_bitsandbytes(monkeypatch):
    fake = FakeLoad(monkeypatch, bitsandbytes=False, cuda=False)
    sstoken.models.load_model("some/model")
    assert "quantization_config" not in fake.kwargs and fake.prepared == []


@pytest.mark.parametrize(("bitsandbytes", "expected"), [
    (None, "4-bit loading (QLoRA) needs bitsandbytes: pip install bitsandbytes"),
    ("0.49.2", "4-bit loading (QLoRA) on a CPU needs bitsandbytes >= 0.50.0 (installed: 0.49.2)"),
])
def test_qlora_without_bitsandbytes_or_its_cpu_backend_fails_before_the_model_loads(
        tmp_path, monkeypatch, capsys, tiny_model_dir, bitsandbytes, expected):
    fake = FakeLoad(monkeypatch, bitsandbytes=bitsandbytes, cuda=False)
    recipe = write_tiny_recipe(tmp_path / "r.yaml", model=tiny_model_dir, output_dir=str(tmp_path / "out"),
                               data=write_tiny_jsonl(tmp_path / "d.jsonl", n_rows=4), load_in_4bit=True,
                               bf16=False)
    assert main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert f"sstoken: error: {expected}" in err and err.count("\n") == 1
    assert fake.kwargs is None


def test_qlora_on_a_cpu_run_loads_onto_the_cpu(monkeypatch):
    fake = FakeLoad(monkeypatch, cuda=True)  # a GPU is there, but the run is on the CPU (use_cpu)
    sstoken.models.load_model("some/model", quantization=quantization_of(load_in_4bit=True), device="cpu")
    assert fake.kwargs["device_map"] == {"": "cpu"}


def test_recipe_lora_flags_train_end_to_end(tmp_path, tiny_model_dir):
    recipe = write_tiny_recipe(tmp_path / "r.yaml", model=tiny_model_dir, output_dir=str(tmp_path / "out"),
                               data=write_tiny_jsonl(tmp_path / "d.jsonl", n_rows=8), max_steps=1,
                               per_device_train_batch_size=4, save_strategy="no", gradient_checkpointing=False)
    assert main(["train", "--config", str(recipe), "--lora_r", "2", "--lora_alpha=4", "--lora_target_modules",
                 "q_proj", "v_proj", "--use_rslora", "--report_to", "none"]) == 0
    import json

    adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["use_rslora"]) == (2, 4, True)
    assert set(adapter["target_modules"]) == {"q_proj", "v_proj"}


def test_max_length_and_max_seq_length_are_one_setting():
    with pytest.raises(ConfigError, match="max_seq_length and max_length are the same setting"):
        split_recipe({"max_seq_length": 256, "max_length": 512})
    run, config = split_recipe(merge_overrides({"max_seq_length": 256}, parse_overrides(["--max_length", "512"])))
    assert run["max_seq_length"] == config["max_length"] == 512
