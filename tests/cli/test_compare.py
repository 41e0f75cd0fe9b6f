"""`sstoken compare` over several seeds: the held-out split of the training data, paired intervals over seeds
and rows, resuming per (method, seed), and the refusals that keep a comparison's runs comparable."""

from __future__ import annotations

import json
import shutil

import pytest

from sstoken.cli import main
from sstoken.evaluation.held_out import held_out_split


def test_held_out_split_is_disjoint_complete_and_reproducible():
    train, held = held_out_split(300, 0.1, seed=0)
    assert len(held) == 30 and len(train) == 270
    assert set(train).isdisjoint(held) and sorted(train + held) == list(range(300))
    assert (train, held) == held_out_split(300, 0.1, seed=0)
    assert held != held_out_split(300, 0.1, seed=1)[1]
    assert held[:3] != [0, 1, 2]  # drawn, not the first rows
    assert len(held_out_split(5, 0.01)[1]) == 1  # never an empty held-out set


def _demo_compare(tiny_model_dir, out, *extra):
    """The demo recipe (its data, LoRA and selection settings) on the tiny model, two steps a run."""
    return ["compare", "--methods", "full", "sstoken", "--model", tiny_model_dir, "--max_steps", "2",
            "--max_seq_length", "256", "--save_strategy", "no", "--report_to", "none", "--plots", "false",
            "--logging_steps", "1", "--output_dir", str(out), *extra]


def test_compare_seeds_on_the_demo_data_without_held_out_data(tmp_path, tiny_model_dir, capsys):
    # First one seed, the recipe's; then two more seeds in the same folder, which reuse the first seed's runs.
    assert main(_demo_compare(tiny_model_dir, tmp_path / "run", "--seed", "0")) == 0
    assert "one training seed" in capsys.readouterr().out
    argv = _demo_compare(tiny_model_dir, tmp_path / "run", "--seeds", "0", "1", "2")
    assert main(argv) == 0
    output = capsys.readouterr().out
    assert output.count("already trained and scored") == 2
    out = tmp_path / "run" / "compare"
    document = json.loads((out / "compare.json").read_text())
    held_out = document["held_out"]
    assert held_out["rows"] == round(0.1 * held_out["split_of"]) and held_out["source"].endswith("demo.jsonl")
    assert f"{held_out['rows']} of the {held_out['split_of']} usable rows of" in output
    assert document["seeds"] == [0, 1, 2]
    setup = json.loads((out / "compare_setup.json").read_text())
    for method in ("full", "sstoken"):
        assert document["methods"][method]["seeds"] == [0, 1, 2]
        for seed in (0, 1, 2):
            result = json.loads((out / f"{method}-seed{seed}" / "compare_result.json").read_text())
            assert len(result["eval"]["held_out_nll"]) == held_out["rows"]  # every run on the same rows
            summary = json.loads((out / f"{method}-seed{seed}" / "summary.json").read_text())
            assert summary["rows_used"] == held_out["split_of"] - held_out["rows"]  # trained on the rest only
    assert len(setup["held_out"]["indices"]) == held_out["rows"]
    seed_points = document["methods"]["full"]["held_out_nll"]["per_seed"]
    assert len(set(seed_points)) == 3  # the seed reaches each run: three different adapters
    delta = document["methods"]["sstoken"]["delta"]["held_out_nll"]
    assert len(delta["per_seed"]) == 3 and delta["ci95"][0] <= delta["mean"] <= delta["ci95"][1]
    table = (out / "compare.md").read_text()
    assert "| sstoken | 3 |" in table and "the 3 seeds" in table and table.strip() in output
    assert (out / "compare.png").stat().st_size > 1000

    # A rerun scores only what is missing: a run stopped while scoring, and a run that never finished.
    (out / "sstoken-seed1" / "compare_result.json").unlink()
    shutil.rmtree(out / "full-seed2")
    assert main(argv) == 0
    output = capsys.readouterr().out
    assert output.count("already trained and scored") == 4
    assert "sstoken seed 1 (5/6): already trained, scoring" in output
    assert "full seed 2 (3/6): training" in output
    assert json.loads((out / "compare.json").read_text())["methods"]["sstoken"]["seeds"] == [0, 1, 2]

    # The same folder with another recipe would pair runs that are not comparable.
    assert main([*argv, "--learning_rate", "0.01"]) == 2
    assert "holds runs of another comparison (recipe key learning_rate differs)" in capsys.readouterr().err
    # The recipe's loss type is what every method but the dft ones trains with.
    assert main([*argv, "--loss_type", "dft"]) == 2
    assert "holds runs of another comparison (recipe key loss_type differs)" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--held_out_fraction", "1"], "--held_out_fraction must be between 0 and 1"),
    (["--held_out_fraction", "0.2", "--eval_data", "held_out.jsonl"], "--held_out_fraction splits the training"),
    (["--seeds", "0", "-1"], "--seeds must be >= 0, got -1"),
])
def test_compare_refuses_bad_settings_before_training(tmp_path, tiny_model_dir, capsys, monkeypatch, extra,
                                                      message):
    from sstoken.testing import write_tiny_jsonl

    monkeypatch.chdir(tmp_path)
    write_tiny_jsonl(tmp_path / "held_out.jsonl", n_rows=4)
    assert main(_demo_compare(tiny_model_dir, tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "\n" not in err.strip()
    assert not (tmp_path / "run").exists()
