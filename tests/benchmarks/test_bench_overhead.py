"""`python benchmarks/overhead.py`: the JSON schema and Markdown output of a --quick run (numbers are not checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import common  # benchmarks/ (on sys.path through conftest.py)
import overhead
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_script(*args: str) -> None:
    """The benchmark as the docs run it: a script, from the repository root, in its own process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "benchmarks/overhead.py", *args], cwd=REPO_ROOT, env=env, check=True)


RECORD_KEYS = {
    "variant": str,
    "seq_len": int,
    "step_s": float,
    "step_cpu_s": float,
    "peak_mem_bytes": int,
    "time_ratio": float,
    "mem_ratio": float,
    "wall_time_ratio": float,
    "cpu_time_ratio": float,
    "extra_mem_bytes": int,
    "time_metric": str,
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out, md = tmp / "overhead.json", tmp / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n## Quality\n\nkept as is\n", encoding="utf-8")
    run_script("--quick", "--out", str(out), "--markdown", str(md))
    return json.loads(out.read_text(encoding="utf-8")), md.read_text(encoding="utf-8")


@pytest.mark.slow
def test_quick_run_records_every_variant_with_ratios(quick_run):
    result, _ = quick_run
    records = result["records"]
    assert [(r["variant"], r["seq_len"]) for r in records] == [(v, 64) for v in overhead.DEFAULT_VARIANTS]
    assert overhead.DEFAULT_VARIANTS[0] == overhead.BASELINE == "trl"
    for record in records:
        for key, kind in RECORD_KEYS.items():
            assert isinstance(record[key], kind), (key, record[key])
        assert record["step_s"] > 0 and record["peak_mem_bytes"] > 0
        assert record["time_metric"] == "cpu"
    stock_trl = records[0]
    assert stock_trl["time_ratio"] == 1.0 and stock_trl["mem_ratio"] == 1.0 and stock_trl["extra_mem_bytes"] == 0
    for record in records[1:]:  # every ratio is against stock TRL's step
        assert record["mem_ratio"] == pytest.approx(record["peak_mem_bytes"] / stock_trl["peak_mem_bytes"], rel=1e-3)
        assert record["cpu_time_ratio"] == pytest.approx(record["step_cpu_s"] / stock_trl["step_cpu_s"], rel=1e-3)


@pytest.mark.slow
def test_quick_run_metadata_and_side_measurements(quick_run):
    result, _ = quick_run
    meta = result["metadata"]
    for key in ("command", "date", "device", "machine", "load_average_before", "load_average_after", "settings"):
        assert key in meta
    assert meta["device"] == "cpu" and meta["quick"] is True
    assert meta["command"].startswith("python benchmarks/overhead.py --quick")
    assert {"torch", "transformers", "cpu_model", "cpu_count"} <= set(meta["machine"])
    attention = result["attention_memory"]
    assert [row["seq_len"] for row in attention["rows"]] == [128]
    assert all(row["share_extra_bytes"] >= 0 and row["eager_extra_bytes"] >= 0 for row in attention["rows"])
    cache = result["cache_throughput"]
    assert cache["rows"] > 0 and cache["cache_s"] > 0 and cache["forward_s"] > 0
    assert cache["throughput_ratio"] == pytest.approx(cache["forward_s"] / cache["cache_s"], rel=1e-3)


@pytest.mark.slow
def test_quick_run_writes_its_table_under_overhead_only(quick_run):
    _, markdown = quick_run
    assert "## Quality\n\nkept as is" in markdown
    assert markdown.index("## Quality") < markdown.index("## Overhead")
    block = markdown.split("<!-- overhead-cpu:begin -->")[1].split("<!-- overhead-cpu:end -->")[0]
    assert "| 64 | trl |" in block and "| 64 | plain |" in block and "| 64 | reference-style |" in block
    assert "time × trl" in block


@pytest.mark.slow
def test_quick_large_vocab_run_trains_the_gemma3_architecture(tmp_path):
    out = tmp_path / "overhead.json"
    overhead.main(["--quick", "--large-vocab", "--variants", "trl", "sstoken-online", "--parts", "steps",
                   "--out", str(out), "--no-markdown"])
    result = json.loads(out.read_text(encoding="utf-8"))
    assert "Gemma3" in result["metadata"]["settings"]["model"]
    assert [r["variant"] for r in result["records"]] == ["trl", "sstoken-online"]
    assert all(r["peak_mem_bytes"] > 0 and r["mem_ratio"] > 0 for r in result["records"])


def test_large_vocab_model_has_gemma_3_270m_shapes(tmp_path):
    from transformers import AutoConfig

    from sstoken.testing import save_tiny_model

    tokenizer_dir = save_tiny_model(tmp_path / "tiny")
    config = AutoConfig.from_pretrained(common.shaped_checkpoint("gemma-3-270m", tokenizer_dir, tmp_path, quick=False))
    assert config.model_type == "gemma3_text"
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (262144, 640, 18)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 1, 256)


def test_marked_block_is_replaced_not_duplicated(tmp_path):
    path = tmp_path / "B.md"
    path.write_text("# Benchmarks\n\n## Overhead\n\nhand-written notes\n\n## Quality\n\nq\n", encoding="utf-8")
    common.replace_marked_block(path, "Overhead", "overhead-cpu", "first")
    common.replace_marked_block(path, "Overhead", "overhead-cpu", "second")
    text = path.read_text(encoding="utf-8")
    assert text.count("<!-- overhead-cpu:begin -->") == 1 and "second" in text and "first" not in text
    assert text.index("hand-written notes") < text.index("second") < text.index("## Quality")


def test_command_line_is_rebuilt_from_the_options():
    import argparse

    parser = argparse.ArgumentParser()
    overhead.add_arguments(parser)
    opts = parser.parse_args(["--seq-lens", "1024", "2048", "--quick"])
    assert overhead.command_of(opts) == "python benchmarks/overhead.py --seq-lens 1024 2048 --quick"


def test_the_wheel_ships_no_benchmark_code():
    import sstoken

    package = Path(sstoken.__file__).parent
    assert not (package / "bench").exists() and not (package / "bench_cli.py").exists()


def test_token_nll_chunks_stay_within_the_byte_bound(monkeypatch):
    """Selection's per-token NLL never builds a full-vocabulary float32 block larger than NLL_CHUNK_BYTES."""
    import torch
    import torch.nn.functional as F

    from sstoken.selection import scoring

    torch.manual_seed(0)
    batch, length, vocab = 3, 40, 1000
    logits, labels = torch.randn(batch, length, vocab), torch.randint(0, vocab, (batch, length))
    labels[1, :25] = scoring.IGNORE_INDEX
    expected = torch.zeros(batch, length)
    expected[:, 1:] = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1),
                                      ignore_index=scoring.IGNORE_INDEX, reduction="none").view(batch, length - 1)
    monkeypatch.setattr(scoring, "NLL_CHUNK_BYTES", 16 * vocab * 4)  # 16 positions per block
    seen = []
    real = F.cross_entropy

    def recording(input, *args, **kwargs):
        seen.append(input.shape[0])
        return real(input, *args, **kwargs)

    monkeypatch.setattr(scoring.F, "cross_entropy", recording)
    got = scoring.token_nll(logits, labels, chunk_size=1024)
    assert torch.allclose(got, expected, atol=1e-5)
    assert max(seen) == 16 and sum(seen) == batch * (length - 1)
