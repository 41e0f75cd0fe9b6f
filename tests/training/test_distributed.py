"""Two processes (DDP over gloo, launched by ``accelerate launch``) train exactly like one process.

One launch of ``tests/helpers/ddp_train.py`` with the shipped ``examples/accelerate/ddp.yaml`` (2 processes)
trains four cases for 3 steps each: ssToken with the online base history (LoRA), with a cached base history
(full fine-tuning), with an EMA history (full fine-tuning), and with a cached history and token weights (DFT's),
and the first again with one micro-batch whose loss is NaN on rank 1 (``skip``); then runs ``sstoken train``
through the CLI, and
shards a model with FSDP2 by hand (the Trainer does not enable FSDP on CPU) to check the EMA history there.
While it runs, this process trains the same cases alone with gradient_accumulation_steps=2, which sees the same
micro-batches (see the helper's docstring for why); the test checks that instead of assuming it.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
HELPERS = REPO / "tests" / "helpers"
sys.path.insert(0, str(HELPERS))

import ddp_train  # noqa: E402  (the helper launched below; imported for the in-process reference)
from launching import launch_beside_reference  # noqa: E402

# Scoped to this module's tests (a module-level filter would silence them for the whole session).
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

WORLD = 2
ATOL = 1e-5


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{case: {"ref": single-process result, 0: rank-0 result, 1: rank-1 result}} plus the CLI run."""
    workdir = tmp_path_factory.mktemp("ddp")
    ddp_train.build_cache(str(workdir))
    ddp_train.write_cli_recipe(str(workdir))
    cases = [*ddp_train.CASES, "skip"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "examples" / "accelerate" / "ddp.yaml"),
        # The shipped file is for GPUs: 2 processes, no bf16 here; use_cpu in the training arguments selects gloo.
        "--num_processes", str(WORLD), "--mixed_precision", "no",
        "--main_process_port", "0",  # a free port: other test runs may share this machine
        str(HELPERS / "ddp_train.py"), "--workdir", str(workdir), "--cases", ",".join(cases + ["cli", "fsdp_ema"]),
    ]
    # The single-process reference trains meanwhile.
    refs = launch_beside_reference(
        command, workdir, env,
        lambda: {case: ddp_train.run_case(case, str(workdir), grad_accum=WORLD) for case in cases},
        "accelerate launch")
    results = {case: {"ref": refs[case], **{r: _load(workdir / f"{case}-rank{r}.pt") for r in range(WORLD)}}
               for case in cases}
    for extra in ("cli", "fsdp_ema"):
        results[extra] = {r: _load(workdir / f"{extra}-rank{r}.pt") for r in range(WORLD)}
    results["workdir"] = workdir
    return results


def _ddp_micro_batches(run: dict) -> list[list[dict]]:
    """Per optimizer step, the micro-batch records of rank 0, rank 1 (one micro-batch each)."""
    return [[run[r]["records"][step] for r in range(WORLD)] for step in range(ddp_train.STEPS)]


def _ref_micro_batches(run: dict) -> list[list[dict]]:
    records = run["ref"]["records"]
    return [records[WORLD * step:WORLD * (step + 1)] for step in range(ddp_train.STEPS)]


@pytest.mark.parametrize("case", ddp_train.CASES)
def test_two_processes_run_distributed(runs, case):
    for rank in range(WORLD):
        result = runs[case][rank]
        assert result["world_size"] == WORLD and result["rank"] == rank
        assert result["distributed_type"] == "DistributedType.MULTI_CPU"
        assert result["wrapper"] == "DistributedDataParallel"
        assert len(result["records"]) == ddp_train.STEPS  # one micro-batch per step per rank
    assert runs[case]["ref"]["world_size"] == 1 and len(runs[case]["ref"]["records"]) == WORLD * ddp_train.STEPS


@pytest.mark.parametrize("case", ddp_train.CASES)
def test_same_samples_and_same_selection_per_step(runs, case):
    """Rank r at step k trains on the reference's micro-batch r of step k and keeps the same tokens."""
    ddp, ref = _ddp_micro_batches(runs[case]), _ref_micro_batches(runs[case])
    for step in range(ddp_train.STEPS):
        rank_keys = [set(record["keys"]) for record in ddp[step]]
        assert not rank_keys[0] & rank_keys[1], "the two ranks must get different samples"
        for rank in range(WORLD):
            assert ddp[step][rank]["step"] == ref[step][rank]["step"] == step
            assert ddp[step][rank]["keys"] == ref[step][rank]["keys"]
            assert torch.equal(ddp[step][rank]["keep"], ref[step][rank]["keep"]), (step, rank)


@pytest.mark.parametrize("case", ddp_train.CASES)
def test_same_loss_and_same_weights_as_one_process(runs, case):
    ddp, ref = _ddp_micro_batches(runs[case]), _ref_micro_batches(runs[case])
    for step in range(ddp_train.STEPS):
        # Logged loss of the step: Trainer averages the ranks' losses; one process sums its accumulated micro-losses.
        ddp_loss = sum(record["loss"] for record in ddp[step]) / WORLD
        ref_loss = sum(record["loss"] for record in ref[step])
        assert ddp_loss == pytest.approx(ref_loss, abs=ATOL), step
    ref_weights = runs[case]["ref"]["weights"]
    for rank in range(WORLD):
        weights = runs[case][rank]["weights"]
        assert weights.keys() == ref_weights.keys()
        for name, value in ref_weights.items():
            assert torch.allclose(weights[name], value, atol=ATOL, rtol=0), (rank, name)
            # DDP gives every rank the same averaged gradient, so the replicas stay bit-identical.
            assert torch.equal(weights[name], runs[case][0]["weights"][name]), (rank, name)
    # Training changed the weights by far more than the tolerance, so the comparison is not vacuous.
    if case == "base":
        initial = {n: torch.zeros_like(v) for n, v in ref_weights.items() if "lora_B" in n}  # LoRA B starts at 0
    else:
        from sstoken.testing import tiny_model

        initial = dict(tiny_model(seed=0).named_parameters())
    moved = max(float((ref_weights[n] - initial[n].detach()).abs().max()) for n in initial)
    assert moved > 100 * ATOL


@pytest.mark.parametrize("case", ddp_train.CASES)
def test_loss_is_normalised_by_the_kept_tokens_of_all_ranks(runs, case):
    """Loss of a step = sum of kept-token NLLs (each times its weight) over both ranks / kept tokens over both ranks
    (not a mean of means, and not divided by the weights)."""
    checked = 0
    for step, (rank0, rank1) in enumerate(_ddp_micro_batches(runs[case])):
        kept = rank0["kept"] + rank1["kept"]
        nll_sum = rank0["kept_nll_sum"] + rank1["kept_nll_sum"]
        for record in (rank0, rank1):
            assert record["denominator"] == kept  # every rank divides by the global count
            # ... and multiplies by the number of processes, because DDP averages gradients over ranks.
            assert record["loss"] == pytest.approx(WORLD * record["kept_nll_sum"] / kept, abs=ATOL)
        global_loss = (rank0["loss"] + rank1["loss"]) / WORLD
        assert global_loss == pytest.approx(nll_sum / kept, abs=ATOL)
        if rank0["kept"] != rank1["kept"]:
            mean_of_means = (rank0["kept_nll_sum"] / rank0["kept"] + rank1["kept_nll_sum"] / rank1["kept"]) / 2
            # The data tells the two rules apart (by far more than the tolerance, relative to a DFT-sized loss).
            assert abs(global_loss - mean_of_means) > 100 * ATOL * min(1.0, abs(global_loss))
            checked += 1
    assert checked >= 1, "the data must give the two ranks different kept counts in some step"


def test_ema_history_is_identical_on_every_rank(runs):
    run = runs["ema"]
    shadows = [run[rank]["ema_shadow"] for rank in range(WORLD)]
    assert shadows[0].keys() == shadows[1].keys() == run["ref"]["ema_shadow"].keys()
    for name in shadows[0]:
        assert torch.equal(shadows[0][name], shadows[1][name]), name
        assert torch.allclose(shadows[0][name], run["ref"]["ema_shadow"][name], atol=ATOL, rtol=0), name
    # The copy gathered across ranks inside the job agrees too.
    gathered = run[0]["ema_gathered"]
    assert gathered.shape[0] == WORLD and torch.equal(gathered[0], gathered[1])
    assert run[0]["ema_updates"] == run[1]["ema_updates"] == ddp_train.STEPS
    # It moved away from the initial weights (decay 0.5, three updates), and stays behind the live weights.
    from sstoken.testing import tiny_model

    initial = dict(tiny_model(seed=0).named_parameters())
    live = run[0]["weights"]
    assert max(float((shadows[0][n] - initial[n].detach()).abs().max()) for n in shadows[0]) > 100 * ATOL
    assert max(float((shadows[0][n] - live[n]).abs().max()) for n in shadows[0]) > 100 * ATOL


def test_a_non_finite_micro_batch_on_one_rank_is_skipped_without_stopping_the_others(runs):
    """Rank 1's second micro-batch has a NaN loss. Its rank still joins DDP's gradient all-reduce (with zeros), so
    the run finishes, both ranks hold the same finite weights, and they equal the one-process run that skips the
    same micro-batch."""
    run = runs["skip"]
    assert [run[rank]["skipped"] for rank in range(WORLD)] == [0, 1] and run["ref"]["skipped"] == 1
    assert run[1]["records"][1]["loss"] == 0.0 and run["ref"]["records"][ddp_train.SKIPPED]["loss"] == 0.0
    reference = run["ref"]["weights"]
    for rank in range(WORLD):
        for name, value in run[rank]["weights"].items():
            assert torch.isfinite(value).all(), (rank, name)
            assert torch.equal(value, run[0]["weights"][name]), (rank, name)
            assert torch.allclose(value, reference[name], atol=ATOL, rtol=0), (rank, name)
    # The skipped micro-batch's gradient was dropped, not applied: the weights differ from the run without the NaN.
    unpoisoned = runs["base"]["ref"]["weights"]
    assert max(float((reference[n] - unpoisoned[n]).abs().max()) for n in reference) > 100 * ATOL


def test_cached_history_is_looked_up_per_rank_shard(runs):
    """Each rank looks up only its own samples, and together they cover the reference step exactly."""
    run = runs["cached"]
    for step, ref_pair in enumerate(_ref_micro_batches(run)):
        ranks = [set(run[rank]["records"][step]["keys"]) for rank in range(WORLD)]
        assert ranks[0] | ranks[1] == set(ref_pair[0]["keys"]) | set(ref_pair[1]["keys"])


def test_cli_train_under_two_processes(runs):
    cli = runs["cli"]
    assert [cli[r]["rc"] for r in range(WORLD)] == [0] * WORLD
    assert [cli[r]["num_processes"] for r in range(WORLD)] == [WORLD] * WORLD
    out = runs["workdir"] / "out-cli"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == ddp_train.CLI_STEPS
    assert math.isfinite(summary["train_loss"])
    # The epoch counter shows that each step consumed WORLD micro-batches of BATCH rows.
    history = json.loads((out / "log_history.json").read_text())
    epoch = max(h.get("epoch", 0) for h in history)
    assert epoch == pytest.approx(ddp_train.CLI_STEPS * ddp_train.BATCH * WORLD / summary["rows_used"], abs=1e-3)
    assert (out / "adapter_model.safetensors").exists()


def test_ema_history_refuses_fsdp2_sharded_parameters(runs):
    """FSDP2 runs here (sharded training equals the unsharded replica), and the EMA built before sharding refuses
    to run on the replaced parameters instead of silently freezing (see EMAHistory._check_params)."""
    for rank in range(WORLD):
        result = runs["fsdp_ema"][rank]
        assert result["sharded"]
        for name, value in result["reference_live"].items():
            assert torch.allclose(result["live"][name], value, atol=ATOL, rtol=0), name
        for use in ("forward", "update"):
            assert result["errors"][use] is not None and "sharded parameters" in result["errors"][use], use


def test_ema_history_refuses_deepspeed_zero3_partitioned_parameters():
    """ZeRO-3 keeps the parameter objects but moves their data into partitions (marked by ``ds_id``)."""
    from sstoken.errors import ConfigError
    from sstoken.selection.history import EMAHistory
    from sstoken.testing import tiny_model

    model = tiny_model(seed=0)
    ema = EMAHistory(model, decay=0.5)
    assert ema.update(1)  # an ordinary model is fine
    param = next(model.parameters())
    param.ds_id, param.ds_shape = 0, param.shape  # two of what deepspeed.zero.Init attaches to every parameter
    with pytest.raises(ConfigError, match="sharded parameters"):
        ema.update(2)


EXAMPLE_CONFIGS = {
    "ddp": ("MULTI_GPU", {}),
    "fsdp": ("FSDP", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
                      "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}),
    "deepspeed_zero2": ("DEEPSPEED", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}),
    "deepspeed_zero3": ("DEEPSPEED", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                                      "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true"}),
}


@pytest.mark.parametrize("name", sorted(EXAMPLE_CONFIGS))
def test_example_accelerate_config_loads(name):
    """Each shipped config goes through what `accelerate launch --config_file` does with it, up to the
    environment the training processes get, and the plugin accelerate builds from that environment."""
    from accelerate import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )
    from accelerate.utils import patch_environment
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    path = REPO / "examples" / "accelerate" / f"{name}.yaml"
    distributed_type, expected_env = EXAMPLE_CONFIGS[name]
    config = load_config_from_file(str(path))  # unknown top-level keys are refused here
    assert config.distributed_type.value == distributed_type and config.num_processes >= 2
    # Nested keys are copied onto launch options without a check: a misspelt one would be silently ignored.
    options = vars(launch_command_parser().parse_args(["train.py"]))
    for key in config.fsdp_config:
        assert (key if key.startswith("fsdp_") else f"fsdp_{key}") in options, key
    for key in config.deepspeed_config:
        assert key in options, key

    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(
        ["--config_file", str(path), "train.py"]))
    if distributed_type == "DEEPSPEED":
        args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config)  # as launch_command sets it
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    for key, value in expected_env.items():
        assert env.get(key) == value, key
    with patch_environment(**{k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}):
        if distributed_type == "FSDP":
            plugin = FullyShardedDataParallelPlugin()
            assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        elif distributed_type == "DEEPSPEED":
            plugin = DeepSpeedPlugin()
            assert plugin.zero_stage == int(expected_env["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
            assert plugin.deepspeed_config["zero_optimization"]["stage"] == plugin.zero_stage
