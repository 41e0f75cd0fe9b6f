"""``bash benchmarks/gpu/check.sh --dry-run``: the GPU check's code end to end on the CPU at test sizes, and its
verdict rules. The numbers of a dry run mean nothing; what is checked is that every part runs and reports."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "benchmarks" / "gpu"))

import check  # noqa: E402  benchmarks/gpu/check.py


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    subprocess.run(["bash", "benchmarks/gpu/check.sh", "--dry-run"], cwd=REPO_ROOT, env=env, check=True)
    return (json.loads((out / "gpu-check.json").read_text(encoding="utf-8")),
            (out / "gpu-check.md").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_dry_run_checks_the_head_and_the_probe_on_every_shape(dry_run):
    result, _ = dry_run
    assert result["metadata"]["dry_run"] is True and "dry run" in result["metadata"]["gpu"]
    numerics = result["numerics"]
    assert [(r["shape"], r["attn_implementation"]) for r in numerics] == [
        (shape, attn) for shape in check.SHAPES for attn in ("sdpa", "eager")]
    for record in numerics:
        assert "error" not in record, record.get("error")
        assert record["full_logits_reason"] is None  # sstoken's head serves every shape, tied or softcapped
        for path in ("head", "full_logits"):
            errors = record[path]
            assert all(math.isfinite(v) for v in (errors["nll"]["mean_abs"], errors["grad"]["rel_norm"],
                                                  errors["loss_rel"]))
            assert errors["keep_agreement"] >= 0.9  # the kept set of the float32 reference, but for bf16 near-ties
        assert record["head_ok"] is True
        assert record["probe"]["logits_max_abs_change"] == 0.0  # the probe leaves the forward alone
        assert ("share_vs_sdpa_max_abs" in record["probe"]) == (record["attn_implementation"] != "sdpa")
        assert record["probe"].get("share_vs_sdpa_max_abs", 0.0) < 0.05  # a few bf16 steps of the [0, 1] share


@pytest.mark.slow
def test_dry_run_measures_steps_and_a_qlora_step_against_stock_trl(dry_run):
    result, _ = dry_run
    steps = result["steps"]
    assert [r["variant"] for r in steps["records"]] == ["trl", "plain", "sstoken-cached", "sstoken-online",
                                                        "sstoken-ema"]
    assert steps["liger_skipped"] == "Liger's kernels need a GPU"
    assert "--dtype bfloat16" in steps["command"] and "--shape qwen2.5-0.5b" in steps["command"]
    for record in steps["records"]:
        assert record["losses"] and all(math.isfinite(x) for x in record["losses"])
        # a verdict exactly where the issue set a target (values themselves: test_target_verdicts)
        assert (record["verdict"] in ("met", "missed")) == (record["variant"] in check.TARGETS)
    qlora = result["qlora"]
    if qlora.get("skipped"):
        assert qlora["skipped"] == "bitsandbytes is not installed"
    else:
        assert [r["variant"] for r in qlora["records"]] == ["trl", "sstoken-online"]
        assert all(math.isfinite(x) for r in qlora["records"] for x in r["losses"])
        assert qlora["settings"]["load_in_4bit"] is True


@pytest.mark.slow
def test_dry_run_writes_one_markdown_section(dry_run):
    _, markdown = dry_run
    assert markdown.startswith("### GPU check: none (dry run on the CPU)")
    for part in ("**(a) Numerics**", "**(b) Step time and peak memory**", "**(c) QLoRA (4-bit)**"):
        assert part in markdown
    assert "| sstoken-cached |" in markdown and "≤ 1.05, ≤ 1.02 |" in markdown


def test_head_verdict_compares_with_the_full_logits_error():
    assert check.head_verdict(0.010, 0.010)
    assert check.head_verdict(0.0125 + check.HEAD_FLOOR, 0.010)
    assert not check.head_verdict(0.0126 + check.HEAD_FLOOR, 0.010)
    assert check.head_verdict(0.0009, 0.0)  # both at rounding level
    assert not check.head_verdict(0.002, 0.0)


@pytest.mark.parametrize(("variant", "time_ratio", "mem_ratio", "expected"), [
    ("sstoken-cached", 1.05, 1.02, "met"),
    ("sstoken-cached", 1.051, 1.0, "missed"),
    ("sstoken-cached", 1.0, 1.021, "missed"),
    ("sstoken-online", 1.35, 1.05, "met"),
    ("sstoken-ema", 1.39, 1.081, "missed"),
    ("sstoken-cached-liger", 1.04, 1.01, "met"),  # against TRL with Liger, with cached history's target
    ("plain", 2.0, 2.0, ""),
    ("sstoken-online", None, 1.0, ""),
])
def test_target_verdicts(variant, time_ratio, mem_ratio, expected):
    assert check.target_verdict(variant, time_ratio, mem_ratio) == expected


def test_a_failed_case_is_reported_not_hidden():
    result = {"metadata": {"gpu": "NVIDIA H100 80GB HBM3", "command": "c", "date": "d", "dry_run": False,
                           "versions": {}, "wall_s": 60},
              "numerics": [{"shape": "qwen2.5-0.5b", "attn_implementation": "flash_attention_2",
                            "error": "Traceback ...\nValueError: could not find sstoken_flash_attention_2\n"}],
              "steps": {"skipped": "time budget (500 s > 330 s)", "records": []}}
    markdown = check.markdown(result)
    assert markdown.startswith("### GPU check: NVIDIA H100 80GB HBM3")
    assert "| flash_attention_2 | – | failed: ValueError: could not find sstoken_flash_attention_2 |" in markdown
    assert "**(b) Step time and peak memory**: skipped (time budget (500 s > 330 s))" in markdown
