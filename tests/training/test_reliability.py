"""Reliability: faults during training, crash and resume, corrupted caches, unsafe loading.

* Numerics: NaN/inf from the model or the history never reach the weights; the step is skipped and counted.
* Crash and resume: a real ``sstoken train`` process is SIGKILLed at a known point and resumed; the result
  equals an uninterrupted run bit for bit (weights, EMA history, random selector, data order).
* History cache: a corrupted or truncated shard is detected by its checksum; ``sstoken cache`` rebuilds
  only that shard.
* Security: no pickle loading in the package, ``trust_remote_code`` off unless asked for.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sstoken.cli import main
from sstoken.errors import ConfigError
from sstoken.selection import scoring
from sstoken.selection.attention import context_share_from_qk
from sstoken.selection.nll_cache import NLLCache, build_nll_cache, sample_key
from sstoken.testing import (
    random_rows,
    tiny_model,
    tiny_tokenizer,
    tiny_trainer,
    write_tiny_jsonl,
    write_tiny_recipe,
)

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src" / "sstoken"
HANG_HELPER = REPO / "tests" / "helpers" / "train_and_hang.py"


@contextlib.contextmanager
def one_thread():
    """The helper process trains on one thread; in-process runs must too to be comparable bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_recipe(path: Path, model: str, data: str, output_dir: Path, **extra) -> Path:
    return write_tiny_recipe(path, **{"model": model, "data": data, "output_dir": str(output_dir),
                                      "per_device_train_batch_size": 2, "learning_rate": 0.01, "logging_steps": 1,
                                      "seed": 0, "dataloader_num_workers": 0, **extra})


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def step_losses(folder: Path) -> list[tuple[int, float]]:
    history = json.loads((folder / "log_history.json").read_text())
    return [(h["step"], h["loss"]) for h in history if "loss" in h]


# --------------------------------------------------------------------------------------------------------------
# Crash and resume
# --------------------------------------------------------------------------------------------------------------


class Child:
    """``sstoken train`` in a real process (tests/helpers/train_and_hang.py) that stops dead at ``hang_at``."""

    def __init__(self, recipe: Path, hang_at: str, workdir: Path):
        self.marker, self.log_path, self.hang_at = workdir / "hanging", workdir / "child.log", hang_at
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"), TOKENIZERS_PARALLELISM="false")
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(HANG_HELPER), str(self.marker), hang_at, "--", "train", "--config", str(recipe)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def kill_when_hanging(self) -> None:
        """Wait until the child reports reaching its point, then SIGKILL it: no handler, no cleanup runs.

        No deadline: on a loaded machine the child may take minutes, and a fixed timeout made this test fail
        for slowness alone. The wait still ends, because the child either reaches the point or exits (a run
        that misses the point finishes training and exits, which fails the test with its log)."""
        while not self.marker.exists():
            assert self.proc.poll() is None, "child exited early:\n" + self.log_path.read_text()[-3000:]
            time.sleep(0.05)
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait() == -signal.SIGKILL  # SIGKILL cannot be caught: the wait ends

    def stop(self) -> None:
        """Whatever happened in the test, leave no process behind."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def assert_same_run(ref: Path, resumed: Path) -> None:
    """Final adapter, every step's loss (so the same batches in the same order) and sstoken state identical."""
    expected, got = adapter_tensors(ref), adapter_tensors(resumed)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert len(step_losses(ref)) == 8
    assert step_losses(resumed) == step_losses(ref)
    ref_file = ref / "checkpoint-8" / "sstoken_state.safetensors"
    got_file = resumed / "checkpoint-8" / "sstoken_state.safetensors"
    assert ref_file.exists() == got_file.exists()
    if not ref_file.exists():  # random selection keeps no state: its draws depend on the step, not history
        return
    ref_state, got_state = load_file(str(ref_file)), load_file(str(got_file))
    assert ref_state.keys() == got_state.keys() and ref_state
    for name in ref_state:
        assert torch.equal(ref_state[name], got_state[name]), name


def train_in_process(*argv: str) -> int:
    with one_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return main(["train", *argv])


@pytest.mark.slow
def test_sigkilled_while_saving_resumes_to_the_same_weights(tmp_path, tiny_model_dir):
    """ssToken + EMA history, SIGKILLed while checkpoint-6 is half written (weights on disk, no optimizer or
    trainer state). Resuming must skip that folder, restart from checkpoint-4 with its EMA history, and end
    exactly where an uninterrupted run ends."""
    data = write_tiny_jsonl(tmp_path / "train.jsonl", n_rows=8)
    settings = dict(max_steps=8, save_steps=2, history="ema", ema_decay=0.5)
    crash_recipe = write_recipe(tmp_path / "crash.yaml", tiny_model_dir, data, tmp_path / "crash", **settings)
    ref_recipe = write_recipe(tmp_path / "ref.yaml", tiny_model_dir, data, tmp_path / "ref", **settings)

    child = Child(crash_recipe, "save:6", tmp_path)
    try:
        assert train_in_process("--config", str(ref_recipe)) == 0  # the reference, while the child trains
        child.kill_when_hanging()
    finally:
        child.stop()

    crash = tmp_path / "crash"
    assert (crash / "checkpoint-4" / "trainer_state.json").exists()
    assert (crash / "checkpoint-6" / "adapter_model.safetensors").exists()
    assert not (crash / "checkpoint-6" / "trainer_state.json").exists()
    # sstoken's own state is written before transformers' files, so trainer_state.json (last) marks completion.
    assert (crash / "checkpoint-6" / "sstoken_state.safetensors").exists()
    assert not (crash / "adapter_model.safetensors").exists()  # it never finished

    assert train_in_process("--config", str(crash_recipe), "--resume_from_checkpoint", "true") == 0
    assert_same_run(tmp_path / "ref", crash)


def test_interrupted_random_selection_resumes_to_the_same_weights(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """Random selection stopped by Ctrl-C after step 5 (checkpoint-4 is the last one): the resumed run must
    continue the selector's random generator and the data order exactly."""
    from transformers import TrainerCallback

    from sstoken.training.trainer import SSTokenTrainer

    data = write_tiny_jsonl(tmp_path / "train.jsonl", n_rows=8)
    settings = dict(max_steps=8, save_steps=2, selection_method="random", rho=0.5)
    recipe = write_recipe(tmp_path / "run.yaml", tiny_model_dir, data, tmp_path / "run", **settings)
    ref_recipe = write_recipe(tmp_path / "ref.yaml", tiny_model_dir, data, tmp_path / "ref", **settings)
    assert train_in_process("--config", str(ref_recipe)) == 0

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise KeyboardInterrupt

    original_init = SSTokenTrainer.__init__

    def init_with_interrupt(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(CtrlC())

    monkeypatch.setattr(SSTokenTrainer, "__init__", init_with_interrupt)
    assert train_in_process("--config", str(recipe)) == 130
    assert "sstoken: interrupted" in capsys.readouterr().err
    monkeypatch.undo()
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    assert train_in_process("--config", str(recipe), "--resume_from_checkpoint", "true") == 0
    assert_same_run(tmp_path / "ref", run)


# --------------------------------------------------------------------------------------------------------------
# Numerics: non-finite values never reach the weights
# --------------------------------------------------------------------------------------------------------------


def make_rows(n: int = 8, prompt_len: int = 5) -> list[dict]:
    return random_rows([prompt_len] * n, [4 + i % 4 for i in range(n)])


def make_trainer(tmp_path, rows, model=None, **overrides):
    settings = dict(max_steps=4, per_device_train_batch_size=4, learning_rate=5e-2, logging_steps=1,
                    lr_scheduler_type="constant")
    settings.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tiny_trainer(tmp_path / "out", rows, model=model, **settings)


def trainable(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def all_finite(trainer) -> bool:
    return all(torch.isfinite(p).all() for p in trainer.model.parameters())


def logged(trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


def test_non_finite_logits_skip_the_step_and_never_reach_the_weights(tmp_path):
    """NaN logits in training step 2 and +inf logits in step 3: both steps are skipped with a warning and
    counted, the weights stay finite, and steps 1 and 4 still train."""
    model = tiny_model("llama")
    calls = {"training_forwards": 0}
    poison = {2: float("nan"), 3: float("inf")}

    def poison_training_forwards(module, inputs, output):
        # Only the forward of the training step: the history pass runs in eval mode.
        if module.training:
            calls["training_forwards"] += 1
            if calls["training_forwards"] in poison:
                return torch.full_like(output, poison[calls["training_forwards"]])
        return output

    # The final norm's output is what the LM head projects: the fused head never calls lm_head as a module.
    model.model.norm.register_forward_hook(poison_training_forwards)
    trainer = make_trainer(tmp_path, make_rows(16), model=model)  # sstoken, history = frozen base (online)
    before = trainable(trainer)
    with pytest.warns(UserWarning, match="non-finite loss") as caught:
        trainer.train()
    assert calls["training_forwards"] == 4
    assert trainer.skipped_nonfinite_steps == 2
    assert len([w for w in caught if "non-finite loss" in str(w.message)]) == 2
    assert all_finite(trainer)
    after = trainable(trainer)
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the other steps did train
    assert all(math.isfinite(x) for x in logged(trainer, "loss"))


def test_nan_and_inf_in_the_history_cache_do_not_poison_selection(tmp_path):
    """A cache whose NLLs contain NaN / ±inf (a broken reference run): REL there is non-finite, min-max
    normalisation gives it 0 (the token is ranked by its attention share alone), the loss stays finite and
    every sample still keeps exactly ceil(rho * n) tokens."""
    rows = make_rows(8)
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    cache_dir = tmp_path / "cache"
    cache = build_nll_cache(model, tokenizer, rows, cache_dir, 64, progress=False)
    poisoned = {}
    for i, row in enumerate(rows):
        key = sample_key(row["input_ids"])
        values = cache.get(key).clone()
        values[-1 - i % 3] = (float("nan"), float("inf"), float("-inf"))[i % 3]
        poisoned[key] = values
    writer = NLLCache.create_or_resume(cache_dir, cache.fingerprints, cache.shard_keys)
    writer.write_shard(0, poisoned)  # a valid checksum: the values themselves are what is broken
    assert NLLCache.open(cache_dir).get(sample_key(rows[0]["input_ids"])).isnan().any()

    trainer = make_trainer(tmp_path, rows, model=model, history_cache=str(cache_dir), max_steps=1,
                           per_device_train_batch_size=8)
    before = trainable(trainer)
    events = []
    trainer.add_selection_listener(events.append)
    trainer.train()
    assert trainer.skipped_nonfinite_steps == 0
    assert all_finite(trainer)
    assert any(not torch.equal(before[n], trainable(trainer)[n]) for n in before)
    signals, keep = events[0].signals, events[0].keep
    assert not torch.isfinite(signals.history_nll[signals.response_mask]).all()  # the poison did arrive
    scores = scoring.sstoken_scores(signals.history_nll, signals.current_nll, signals.context_share,
                                    signals.response_mask, gamma=0.5)
    assert torch.isfinite(scores).all()
    kept_per_row = keep.sum(dim=1)
    expected = [scoring.keep_count(int(n), 0.6) for n in signals.response_mask.sum(dim=1)]
    assert kept_per_row.tolist() == expected


def test_constant_rel_falls_back_to_attention_ranking():
    """REL equal on every token of a sample (history = current + c): Norm(REL) is 0, not 0/0.

    Quarter-integer NLLs keep history - current exactly constant in float32; with arbitrary floats the
    rounding noise of the subtraction would itself be stretched to [0, 1] by plain min-max normalisation."""
    gen = torch.Generator().manual_seed(1)
    current = torch.randint(0, 12, (2, 10), generator=gen).float() / 4
    share = torch.rand(2, 10, generator=gen)
    response = torch.ones(2, 10, dtype=torch.bool)
    response[:, :3] = False
    history = current + 0.75
    scores = scoring.sstoken_scores(history, current, share, response, gamma=0.5)
    assert torch.isfinite(scores).all()
    assert torch.equal(scoring.sstoken_mask(history, current, share, response, gamma=0.5, rho=0.5),
                       scoring.top_rho_mask(share, response, 0.5))


def test_sample_without_context_trains_with_zero_attention_share(tmp_path):
    """An empty prompt (prompt_completion with prompt ""): every token is response, no key is context,
    so the attention share is 0 everywhere (never NaN) and selection falls back to REL."""
    from sstoken.data.encoding import encode_row

    tokenizer = tiny_tokenizer()
    rows = []
    for i in range(8):
        encoded = encode_row({"prompt": "", "completion": f"Alice was born in {1950 + i}."}, tokenizer, 64)
        assert all(label != -100 for label in encoded.labels)
        rows.append(encoded.as_dict())
    trainer = make_trainer(tmp_path, rows, max_steps=1, per_device_train_batch_size=8)
    trainer.train()
    assert trainer.skipped_nonfinite_steps == 0
    assert all_finite(trainer)
    assert logged(trainer, "mean_attention_share") and all(v == 0.0 for v in logged(trainer, "mean_attention_share"))
    assert all(0.55 < v <= 0.75 for v in logged(trainer, "kept_fraction"))


def test_all_padding_rows_give_finite_loss_and_gradients(tmp_path):
    """A batch with a row that is only padding, and a batch with no response token at all."""
    trainer = make_trainer(tmp_path, make_rows(4))
    pad = tiny_tokenizer().pad_token_id
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [pad] * 6])
    mask = torch.tensor([[1] * 6, [0] * 6])
    labels = torch.tensor([[-100, -100, -100, 8, 9, 10], [-100] * 6])
    trainer.model.train()
    for batch_labels in (labels, torch.full_like(labels, -100)):
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, {"input_ids": ids, "attention_mask": mask, "labels": batch_labels})
        assert torch.isfinite(loss)
        loss.backward()
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        assert all(torch.isfinite(g).all() for g in grads)
    assert trainer.skipped_nonfinite_steps == 0
    # The padding row sees no key at all: its share is 0, not 0/0.
    q = torch.randn(2, 4, 6, 8)
    k = torch.randn(2, 2, 6, 8)
    share = context_share_from_qk(q, k, 8 ** -0.5, labels == -100, mask.bool())
    assert torch.isfinite(share).all() and (share[1] == 0).all()


def test_a_step_that_makes_weights_non_finite_stops_the_run_before_it_is_saved(tmp_path):
    """With an infinite learning rate the loss of step 1 is finite but its update is not. The run must
    stop right after that optimizer step, before transformers checkpoints it, instead of saving NaN weights
    behind a normal summary (skipped_nonfinite_steps counts only non-finite losses)."""
    from sstoken.training.guards import TrainingDiverged

    trainer = make_trainer(tmp_path, make_rows(8), learning_rate=float("inf"), save_strategy="steps", save_steps=1)
    with pytest.raises(TrainingDiverged, match=r"optimizer step 1 made trainable weights NaN or inf \(.*lora_"):
        trainer.train()
    assert trainer.state.global_step == 1 and trainer.skipped_nonfinite_steps == 0
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").glob("checkpoint-*")) == []


def test_sstoken_train_stops_on_non_finite_weights_without_saving_them(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """The CLI side of the guard: exit 2, one error line of its own after the progress bar, the checkpoints of
    the finite steps kept, and no final adapter or summary.json that would look like a normal result."""
    import sstoken.training.guards

    real_check = sstoken.training.guards.first_non_finite_parameter
    steps = {"n": 0}

    def diverges_at_step_2(model):
        steps["n"] += 1
        return "base_model.model.lm_head.weight" if steps["n"] == 2 else real_check(model)

    monkeypatch.setattr(sstoken.training.guards, "first_non_finite_parameter", diverges_at_step_2)
    data = write_tiny_jsonl(tmp_path / "train.jsonl", n_rows=8)
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, data, out, max_steps=4, save_steps=1)
    capsys.readouterr()
    assert train_in_process("--config", str(recipe)) == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if "sstoken: error:" in line]
    assert error_lines == ["sstoken: error: optimizer step 2 made trainable weights NaN or inf "
                           "(base_model.model.lm_head.weight) although the loss was finite; training stopped and "
                           "nothing from this step was saved. Lower learning_rate (now 0.01) or set max_grad_norm"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (out / "adapter_model.safetensors").exists() and not (out / "summary.json").exists()


def test_attention_hook_that_never_fires_stops_the_step(tmp_path, monkeypatch):
    """An attention layer that gets its function without the modeling file's AttentionInterface bypasses the hook.
    Selecting with an attention share of zeros would silently train on REL alone; the step must fail instead."""
    import transformers.modeling_utils
    import transformers.models.llama.modeling_llama as modeling_llama

    trainer = make_trainer(tmp_path, make_rows(8), max_steps=1)
    monkeypatch.setattr(modeling_llama, "ALL_ATTENTION_FUNCTIONS", transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS)
    before = trainable(trainer)
    with pytest.raises(ConfigError, match="attention share was not captured"):
        trainer.train()
    after = trainable(trainer)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_cache_built_before_the_trainer_aligned_special_token_ids_is_accepted(tmp_path):
    """The Trainer copies the tokenizer's pad id into the model config when it is built. A cache built
    from Python before that (config without pad_token_id) is still this model's cache."""
    rows = make_rows(8)
    model, tokenizer = tiny_model("llama", pad_token_id=None), tiny_tokenizer()
    build_nll_cache(model, tokenizer, rows, tmp_path / "cache", 64, progress=False)
    trainer = make_trainer(tmp_path, rows, model=model, history_cache=str(tmp_path / "cache"), max_steps=1)
    assert model.config.pad_token_id == tokenizer.pad_token_id  # the trainer did change the config
    trainer.train()
    assert trainer.state.global_step == 1
    # A different model is still told apart.
    with pytest.raises(ConfigError, match="built for a different model"):
        make_trainer(tmp_path, rows, model=tiny_model("llama", seed=1), history_cache=str(tmp_path / "cache"))


# --------------------------------------------------------------------------------------------------------------
# History cache: checksums and rebuilding only what is broken
# --------------------------------------------------------------------------------------------------------------


def flip_byte(path: Path, offset_from_end: int = 7) -> None:
    payload = bytearray(path.read_bytes())
    payload[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(payload))


def test_corrupted_shards_are_detected_and_only_they_are_rebuilt(tmp_path):
    rows = make_rows(10)
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    folder = tmp_path / "cache"
    original = build_nll_cache(model, tokenizer, rows, folder, 64, batch_size=2, shard_size=4, progress=False)
    assert len(original.shard_keys) == 3
    values = {key: original.get(key).clone() for keys in original.shard_keys for key in keys}
    good_bytes = original.shard_path(0).read_bytes()

    flip_byte(original.shard_path(1))  # corrupted in place: same size, one byte differs
    with pytest.raises(ConfigError, match="shard 1 fails its checksum"):
        NLLCache.open(folder)
    shard2 = original.shard_path(2)
    shard2.write_bytes(shard2.read_bytes()[: shard2.stat().st_size // 2])  # truncated
    (folder / "shard-00002.safetensors.tmp-12345").write_bytes(b"left by a killed writer")

    scored = []
    model.register_forward_pre_hook(lambda module, args, kwargs: scored.append(kwargs["input_ids"].shape[0]),
                                    with_kwargs=True)
    rebuilt = build_nll_cache(model, tokenizer, rows, folder, 64, batch_size=2, shard_size=4, progress=False)
    assert sum(scored) == len(original.shard_keys[1]) + len(original.shard_keys[2])  # shard 0 was not redone
    assert original.shard_path(0).read_bytes() == good_bytes
    reopened = NLLCache.open(folder)
    for key, value in values.items():
        assert torch.equal(reopened.get(key), value)
    assert len(rebuilt) == len(values)


def test_unreadable_or_missing_cache_index(tmp_path):
    rows = make_rows(4)
    folder = tmp_path / "cache"
    build_nll_cache(tiny_model("llama"), tiny_tokenizer(), rows, folder, 64, progress=False)
    index = folder / "index.json"
    index.write_text(index.read_text()[:40])  # cut off mid-write
    with pytest.raises(ConfigError, match="unreadable index.json"):
        NLLCache.open(folder)
    index.unlink()
    with pytest.raises(ConfigError, match="does not exist or is incomplete"):
        NLLCache.open(folder)
    (folder / "shard-00000.safetensors").unlink()
    with pytest.raises(ConfigError, match="does not exist or is incomplete"):
        NLLCache.open(folder)
    build_nll_cache(tiny_model("llama"), tiny_tokenizer(), rows, folder, 64, progress=False)
    assert len(NLLCache.open(folder)) == len(rows)


def test_corrupted_cache_stops_sstoken_train_and_sstoken_cache_repairs_it(tmp_path, tiny_model_dir, capsys):
    data = write_tiny_jsonl(tmp_path / "train.jsonl", n_rows=6)
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, data, out, history_cache=str(tmp_path / "nll"),
                          max_steps=1, save_strategy="no")
    assert main(["cache", "--config", str(recipe)]) == 0
    shard = tmp_path / "nll" / "shard-00000.safetensors"
    good = shard.read_bytes()
    flip_byte(shard)

    capsys.readouterr()
    assert main(["train", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "sstoken: error: history cache" in err and "fails its checksum" in err and "Traceback" not in err
    assert not any(out.glob("checkpoint-*")) and not (out / "adapter_model.safetensors").exists()

    assert main(["cache", "--config", str(recipe)]) == 0
    assert shard.read_bytes() == good  # the same model gives the same bytes
    assert train_in_process("--config", str(recipe)) == 0
    assert (out / "adapter_model.safetensors").exists()


# --------------------------------------------------------------------------------------------------------------
# Security: nothing in the package unpickles, remote code only when asked for
# --------------------------------------------------------------------------------------------------------------

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def unsafe_calls(source: str, filename: str = "<source>") -> list[str]:
    """Lines of ``source`` that could run code from a file: unpickling loaders, ``torch.load`` without
    ``weights_only=True``, YAML's full loaders, ``trust_remote_code=True`` written into the code."""
    import ast

    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if any(name.split(".")[0] in UNSAFE_MODULES for name in names):
                problems.append(f"{where}: imports {', '.join(names)}")
            if isinstance(node, ast.ImportFrom) and node.module == "torch" and \
                    any(a.name == "load" for a in node.names):
                problems.append(f"{where}: from torch import load")
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        if func.endswith("torch.load") or func == "torch.load":
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                problems.append(f"{where}: torch.load without weights_only=True")
        if func in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
            problems.append(f"{where}: {func} (use yaml.safe_load)")
        flag = keywords.get("trust_remote_code")
        if isinstance(flag, ast.Constant) and flag.value is True:
            problems.append(f"{where}: trust_remote_code=True")
    return problems


def test_the_scanner_finds_what_it_looks_for():
    bad = (
        "import pickle\nfrom torch import load\nimport torch, yaml\n"
        "torch.load(f)\ntorch.load(f, weights_only=False)\ntorch.load(f, weights_only=True)\n"
        "yaml.load(s)\nyaml.safe_load(s)\nAutoModel.from_pretrained(p, trust_remote_code=True)\n"
        "AutoModel.from_pretrained(p, trust_remote_code=flag)\n"
    )
    found = unsafe_calls(bad)
    assert [p.split(":")[1] for p in found] == ["1", "2", "4", "5", "7", "9"], found


def test_package_never_unpickles_or_trusts_remote_code_by_default():
    import inspect

    from sstoken import models
    from sstoken.cli.recipe import RUN_KEYS

    files = sorted(SRC.rglob("*.py"))
    assert len(files) >= 10
    problems = [p for path in files for p in unsafe_calls(path.read_text(encoding="utf-8"), str(path))]
    assert problems == []
    assert RUN_KEYS["trust_remote_code"] is False
    for loader in (models.load_model, models.load_tokenizer):
        assert inspect.signature(loader).parameters["trust_remote_code"].default is False
    # Every place that passes trust_remote_code passes the recipe's value (never a literal).
    passing = [line for path in files for line in path.read_text(encoding="utf-8").splitlines()
               if re.search(r"trust_remote_code\s*=(?!=)", line) and "def " not in line]
    assert passing and all(re.search(r"trust_remote_code\s*=\s*(trust_remote_code|run\[)", line)
                           for line in passing), passing
