"""Sharded and partitioned weights (FSDP2, DeepSpeed ZeRO-3, ZeRO-2) train exactly like one unsharded process.

One launch of ``tests/helpers/sharded_train.py`` (2 processes over gloo, DeepSpeed on its CPU accelerator) trains
every case for 3 SGD steps through sstoken's pipeline and LM head (see the helper's docstring); meanwhile this
process trains the same micro-batches unsharded, two accumulated per step. Checked per case: the same keep masks
and losses at every step, the same final weights, the head used (not the full logits) and the same model
fingerprint on every rank; a NaN micro-batch on one rank skipped without stopping the other.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
HELPERS = REPO / "tests" / "helpers"
sys.path.insert(0, str(HELPERS))

import ddp_train  # noqa: E402
import sharded_train  # noqa: E402
from launching import launch_beside_reference  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

WORLD = sharded_train.WORLD
ATOL = 1e-6
TRAINED = ("fsdp_full", "fsdp_tied", "fsdp_lora", "fsdp_head_unit", "fsdp_meta", "zero3_full", "zero3_tied",
           "zero3_lora", "zero2_ema")
SKIPPED = ("fsdp_skip", "zero3_skip")


def reference_case(case: str) -> str:
    """The one-process run a case is compared with (the engine does not change what is trained)."""
    if case in ("fsdp_head_unit", "fsdp_meta"):
        return "fsdp_full"
    return "fsdp_" + case.split("_", 1)[1] if case.startswith("zero3") else case


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{case: {"ref": one-process result, 0: rank 0's, 1: rank 1's}}, plus the unsharded fingerprints."""
    pytest.importorskip("deepspeed")
    from transformers import AutoModelForCausalLM

    from sstoken.selection.nll_cache import model_fingerprint
    from sstoken.testing import tiny_model

    workdir = tmp_path_factory.mktemp("sharded")
    ddp_train.build_cache(str(workdir))
    paths = {"tiny-model": tiny_model(seed=0), "tiny-model-seed1": tiny_model(seed=1),
             "tiny-model-tied": tiny_model(seed=0, tie_word_embeddings=True)}
    fingerprints = {}
    for name, model in paths.items():
        model.save_pretrained(workdir / name)
        fingerprints[name] = model_fingerprint(AutoModelForCausalLM.from_pretrained(workdir / name))
    fingerprints["in-memory"] = model_fingerprint(tiny_model(seed=0))
    fingerprints["in-memory-tied"] = model_fingerprint(tiny_model(seed=0, tie_word_embeddings=True))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",  # --standalone: a free port
               "--nproc_per_node", str(WORLD), str(HELPERS / "sharded_train.py"), "--workdir", str(workdir)]
    refs = launch_beside_reference(
        command, workdir, env, lambda: {case: sharded_train.run_reference(case, str(workdir))
                                        for case in {reference_case(c) for c in TRAINED + SKIPPED}},
        "the 2-process launch")
    results = {case: {"ref": refs[reference_case(case)],
                      **{r: torch.load(workdir / f"{case}-rank{r}.pt", weights_only=False) for r in range(WORLD)}}
               for case in TRAINED + SKIPPED}
    results["fingerprints"] = fingerprints
    return results


def assert_same_training(run: dict) -> None:
    ref_records = run["ref"]["records"]
    for rank in range(WORLD):
        records = run[rank]["records"]
        assert len(records) == sharded_train.STEPS
        for step, record in enumerate(records):
            ref = ref_records[WORLD * step + rank]
            assert torch.equal(record["keep"], ref["keep"]), (rank, step)
            # The reference scales each micro-batch's loss by 1/WORLD (the engines average gradients instead).
            assert record["loss"] == pytest.approx(WORLD * ref["loss"], abs=ATOL), (rank, step)
        weights = run[rank]["weights"]
        assert weights.keys() == run["ref"]["weights"].keys()
        for name, value in run["ref"]["weights"].items():
            assert torch.isfinite(weights[name]).all(), (rank, name)
            torch.testing.assert_close(weights[name], value, atol=ATOL, rtol=0, msg=f"rank {rank}: {name}")


@pytest.mark.parametrize("case", TRAINED)
def test_sharded_training_equals_one_process(runs, case):
    run = runs[case]
    assert_same_training(run)
    for rank in range(WORLD):
        assert run[rank].get("head_reason", run[rank].get("reason_after_loading")) is None, "sstoken's head runs"
        if case.startswith("fsdp") and case != "fsdp_meta":
            assert run[rank]["sharded"], "every parameter a DTensor shard"
        if case.startswith("zero3"):
            assert run[rank]["partitioned"], "the head weight is an empty ZeRO-3 placeholder outside the forward"
    # Training moved the weights by far more than the tolerance, so the comparison is not vacuous.
    settings = sharded_train.case_settings(case)
    initial = dict(sharded_train.build_model(settings["tied"], settings["lora"]).named_parameters())
    moved = max(float((run["ref"]["weights"][n] - initial[n].detach()).abs().max()) for n in run["ref"]["weights"])
    assert moved > 1000 * ATOL


def test_ema_history_under_zero2_equals_one_process(runs):
    run = runs["zero2_ema"]
    for rank in range(WORLD):
        for name, value in run["ref"]["ema"].items():
            torch.testing.assert_close(run[rank]["ema"][name], value, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", SKIPPED)
def test_a_non_finite_micro_batch_is_skipped_under_sharding(runs, case):
    """Rank 1's loss is NaN at step 2: its backward still joins FSDP's / ZeRO's reduce-scatter, with zero gradients,
    and the result equals one process skipping that micro-batch."""
    run = runs[case]
    step, rank = sharded_train.SKIPPED
    assert [record["finite"] for record in run[rank]["records"]] == [s != step for s in range(sharded_train.STEPS)]
    assert all(record["finite"] for record in run[1 - rank]["records"])
    assert_same_training(run)
    unskipped = runs["fsdp_full"]["ref"]["weights"]
    assert max(float((run["ref"]["weights"][n] - unskipped[n]).abs().max()) for n in unskipped) > 1000 * ATOL


@pytest.mark.parametrize("case", [c for c in TRAINED + SKIPPED if c.startswith("fsdp")])
def test_fsdp2_fingerprint_is_that_of_the_gathered_weights(runs, case):
    """Sharded or not, with a LoRA adapter or not, the fingerprint is the unsharded base model's."""
    fingerprints = runs["fingerprints"]
    expected = {"fsdp_tied": fingerprints["in-memory-tied"], "fsdp_meta": fingerprints["tiny-model"]}
    for rank in range(WORLD):
        assert runs[case][rank]["fingerprint"] == expected.get(case, fingerprints["in-memory"])


def test_zero3_fingerprint_tells_weights_apart(runs):
    """Hashing the empty partitions gave two models of the same architecture one fingerprint; the gathered
    weights give each its own, the same as unpartitioned."""
    fingerprints = runs["fingerprints"]
    assert fingerprints["tiny-model"] != fingerprints["tiny-model-seed1"]
    for rank in range(WORLD):
        assert runs["zero3_full"][rank]["fingerprint"] == fingerprints["tiny-model"]
        assert runs["zero3_full"][rank]["fingerprint_other"] == fingerprints["tiny-model-seed1"]
        assert runs["zero3_tied"][rank]["fingerprint"] == fingerprints["tiny-model-tied"]
        assert runs["zero3_lora"][rank]["fingerprint"] == fingerprints["tiny-model"]  # the adapter is left out


def test_meta_weights_on_one_rank_give_one_decision_everywhere(runs):
    """FSDP2's cpu_ram_efficient_loading: before rank 0's weights are broadcast, rank 1 holds meta tensors. Every rank
    gets rank 0's fingerprint and the same head decision (full logits, saying why), so no rank waits on another in
    a collective the others skip; once the weights are in, every rank uses the head."""
    run = runs["fsdp_meta"]
    assert [run[rank]["meta"] for rank in range(WORLD)] == [False, True]
    reasons = [run[rank]["reason_before_loading"] for rank in range(WORLD)]
    assert reasons[0] == reasons[1] and "not loaded on rank 1 (meta tensors)" in reasons[0]
    assert [run[rank]["reason_after_loading"] for rank in range(WORLD)] == [None, None]


# ----------------------------------------------------------------------------------------------- one process
def test_weights_that_are_not_loaded_are_named_not_hashed():
    """A model whose weights are meta tensors (not loaded) has no fingerprint and no head check: both say why."""
    from sstoken.errors import ConfigError
    from sstoken.selection import lm_head
    from sstoken.selection.nll_cache import model_fingerprint
    from sstoken.testing import tiny_model

    model = tiny_model(seed=0).to("meta")
    with pytest.raises(ConfigError, match=r"weight \S+ is not loaded \(a meta tensor\) on rank 0"):
        model_fingerprint(model)
    assert lm_head.full_logits_reason(model) == ("the weights of LlamaForCausalLM are not loaded (meta tensors), so "
                                                 "sstoken's head cannot be checked")


@pytest.mark.parametrize("settings, engine", [
    (dict(), "replicated"),
    (dict(fsdp="full_shard"), "fsdp2"),
    (dict(deepspeed={"zero_optimization": {"stage": 2}}), "deepspeed"),
    (dict(deepspeed={"zero_optimization": {"stage": 3}}), "deepspeed-zero3"),
])
def test_the_engine_is_read_from_the_training_arguments(settings, engine, tmp_path):
    from sstoken.training.config import SSTokenConfig, training_engine

    assert training_engine(SSTokenConfig(output_dir=str(tmp_path), report_to=[], **settings)) == engine


@pytest.mark.parametrize("environment, expected", [
    ({"ACCELERATE_USE_FSDP": "true"}, "FSDP version 1 is not supported"),  # accelerate's default version
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP version 1 is not supported"),
    ({"PARALLELISM_CONFIG_TP_SIZE": "2"}, "parallelism_config tp_size=2 is not supported"),
    ({"PARALLELISM_CONFIG_CP_SIZE": "4"}, "parallelism_config cp_size=4 is not supported"),
])
def test_unproven_launch_settings_are_refused_before_the_model_loads(environment, expected, tmp_path, monkeypatch):
    """What `accelerate launch` passes the training processes in their environment is checked like the arguments,
    when the configuration is built (the CLI builds it before it loads the model)."""
    from sstoken.errors import ConfigError
    from sstoken.training.config import SSTokenConfig

    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=expected):
        SSTokenConfig(output_dir=str(tmp_path), report_to=[])
    monkeypatch.setenv("FSDP_VERSION", "2")
    if "ACCELERATE_USE_FSDP" in environment:
        SSTokenConfig(output_dir=str(tmp_path), report_to=[])  # FSDP2 is fine
