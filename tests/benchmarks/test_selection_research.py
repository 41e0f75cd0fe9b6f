"""The experimental selectors of benchmarks/selection_research.py, on hand-computed cases."""

from __future__ import annotations

import pytest
import selection_research
import torch

from sstoken.selection.selectors import SELECTORS, Signals, make_selector

# One sample, 2 context tokens then 4 response tokens.
RESPONSE = torch.tensor([[False, False, True, True, True, True]])
HISTORY = torch.tensor([[0.0, 0.0, 9.0, 1.0, 4.0, 2.0]])
CURRENT = torch.tensor([[0.0, 0.0, 1.0, 0.5, 3.0, 2.0]])  # REL = 8, 0.5, 1, 0
SHARE = torch.tensor([[0.0, 0.0, 0.9, 0.2, 0.5, 0.1]])


def signals(**overrides) -> Signals:
    values = dict(response_mask=RESPONSE, current_nll=CURRENT, history_nll=HISTORY, context_share=SHARE)
    values.update(overrides)
    return Signals(**values)


def kept(name: str, rho: float = 0.5, **overrides) -> list[int]:
    keep = make_selector(name, rho=rho, gamma=0.5).select(signals(**overrides))
    return keep[0].nonzero().flatten().tolist()


def test_every_variant_is_registered_and_declares_its_needs():
    for name in selection_research.VARIANTS:
        assert name in SELECTORS
    assert not make_selector("x_smallloss").needs_history and not make_selector("x_smallloss").needs_attention
    assert make_selector("x_plausible").needs_history and not make_selector("x_plausible").needs_attention
    assert make_selector("x_lowrel").needs_history and not make_selector("x_lowrel").needs_attention
    assert make_selector("x_debiased").needs_attention


def test_low_rel_keeps_what_was_learnt_least():
    # REL 8, 0.5, 1, 0 at positions 2..5: the two lowest are positions 5 (0) and 3 (0.5).
    assert kept("x_lowrel") == [3, 5]


def test_plausible_keeps_the_lowest_base_nll():
    assert kept("x_plausible") == [3, 5]  # base NLL 1 and 2


def test_small_loss_keeps_the_lowest_current_nll():
    assert kept("x_smallloss") == [2, 3]  # current NLL 1 and 0.5


def test_position_baseline_is_the_uniform_share():
    # Position i sees i+1 tokens, of which the context tokens before or at i.
    expected = torch.tensor([[1 / 1, 2 / 2, 2 / 3, 2 / 4, 2 / 5, 2 / 6]])
    assert torch.allclose(selection_research.position_baseline(RESPONSE), expected)


def test_debiased_attention_divides_by_the_position_baseline():
    # γ=0 isolates the attention part: share / baseline = 1.35, 0.4, 1.25, 0.3 -> keeps positions 2 and 4.
    keep = make_selector("x_debiased", rho=0.5, gamma=0.0).select(signals())
    assert keep[0].nonzero().flatten().tolist() == [2, 4]


def test_batch_budget_is_shared_across_samples():
    response = torch.tensor([[True, True, True, True], [True, True, False, False]])
    history = torch.tensor([[5.0, 5.0, 5.0, 5.0], [5.0, 5.0, 0.0, 0.0]])
    current = torch.tensor([[4.0, 4.5, 4.9, 5.0], [1.0, 0.0, 0.0, 0.0]])
    share = torch.zeros(2, 4)
    s = Signals(response_mask=response, current_nll=current, history_nll=history, context_share=share)
    selector = make_selector("x_batch", rho=0.5, gamma=1.0)
    assert selector.expected_kept(response) == 3  # ceil(0.5 * 6), not 2 + 1 per sample
    keep = selector.select(s)
    assert int(keep.sum()) == 3 and not (keep & ~response).any()
    # Per-sample min-max makes each sample's best token 1.0: both samples' best and one tie-broken next.
    assert bool(keep[0, 0]) and bool(keep[1, 1])


@pytest.mark.parametrize("name", selection_research.VARIANTS)
def test_variants_keep_only_response_tokens(name):
    keep = make_selector(name, rho=0.6).select(signals())
    assert int(keep.sum()) == 3 and not (keep & ~RESPONSE).any()


# ------------------------------------------------------------------------------------------------ round 2
# Noise codes as the quality benchmark hands them to the oracles (as the reference NLL): 0 clean, 1 boilerplate,
# 2 wrong fact, 3 corrupt. Row 0: 2 context tokens, then boilerplate, clean, wrong fact, clean, corrupt, clean.
ORACLE_RESPONSE = torch.tensor([[False, False, True, True, True, True, True, True],
                                [False, False, True, True, True, False, False, False]])
NOISE = torch.tensor([[0.0, 0.0, 1, 0, 2, 0, 3, 0],
                      [0.0, 0.0, 0, 0, 0, 0, 0, 0]])


def oracle_signals() -> Signals:
    return Signals(response_mask=ORACLE_RESPONSE, current_nll=torch.ones(2, 8), reference_nll=NOISE)


@pytest.mark.parametrize("name, row0", [
    ("x_oracle_clean", [3, 5, 7]),
    ("x_oracle_keep_wrong", [3, 4, 5, 7]),
    ("x_oracle_drop_boilerplate", [3, 4, 5, 6, 7]),
    ("x_oracle_drop_wrong", [2, 3, 5, 6, 7]),
    ("x_oracle_drop_corrupt", [2, 3, 4, 5, 7]),
    ("x_oracle_clean_samples", []),
])
def test_oracles_keep_exactly_the_tokens_of_the_kinds_they_do_not_drop(name, row0):
    selector = make_selector(name, rho=0.5)  # ρ is ignored: an oracle keeps every token it does not drop
    keep = selector.select(oracle_signals())
    assert keep[0].nonzero().flatten().tolist() == row0
    assert keep[1].nonzero().flatten().tolist() == [2, 3, 4]  # the clean sample is kept whole
    # the count is known before the forward, from the same record
    assert selector.expected_kept(ORACLE_RESPONSE, None, oracle_signals()) == int(keep.sum())
    assert selector.needs_reference and selector.needs_cached_counts


def test_noise_cache_holds_the_noise_record(tmp_path):
    from quality import build_noise_cache

    from sstoken.selection.nll_cache import sample_key
    from sstoken.testing import random_rows, tiny_tokenizer

    rows = random_rows([3, 2], [4, 3], seed=0)
    flags = [[None, None, None, "boilerplate", None, "wrong_fact", "corrupt"], [None, None, None, None, None]]
    cache = build_noise_cache(rows, flags, tiny_tokenizer(), tmp_path / "noise", 64)
    assert cache.get(sample_key(rows[0]["input_ids"])).tolist() == [0, 0, 0, 1, 0, 2, 3]
    assert cache.get(sample_key(rows[1]["input_ids"])).tolist() == [0] * 5


def test_adaptive_outlier_keeps_a_sample_without_outliers_whole():
    response = torch.tensor([[False, True, True, True, True, True]] * 2)
    current = torch.tensor([[0.0, 1.0, 1.2, 0.9, 1.1, 1.0],     # no outlier: all kept
                            [0.0, 1.0, 1.2, 0.9, 1.1, 6.0]])    # 6.0 > median 1.1 + 2·max(MAD·1.48, 0.25)
    selector = make_selector("x_adapt_outlier")
    keep = selector.select(Signals(response_mask=response, current_nll=current))
    assert keep[0].tolist() == response[0].tolist()
    assert keep[1].nonzero().flatten().tolist() == [1, 2, 3, 4]
    assert selector.expected_kept(response) is None  # known only after the forward
    assert not selector.needs_history and not selector.needs_attention


def test_robust_outliers_uses_the_floor_for_equal_losses():
    response = torch.tensor([[True, True, True, True]])
    values = torch.tensor([[1.0, 1.0, 1.0, 1.4]])  # MAD 0: the floor 0.25 → threshold 1.5, nothing dropped
    assert not selection_research.robust_outliers(values, response).any()
    values = torch.tensor([[1.0, 1.0, 1.0, 1.6]])
    assert selection_research.robust_outliers(values, response)[0].tolist() == [False, False, False, True]


def test_adaptive_rho_gives_a_clean_looking_sample_a_larger_budget():
    # Batch 80% quantile of the current NLL over the 8 response tokens is 5.8 (interpolated): row 0 has all 4 below (ρ = 1),
    # row 1 has 2 of 4 below (ρ = 0.5), kept by ssToken's score (γ = 1: REL).
    response = torch.tensor([[True, True, True, True], [True, True, True, True]])
    current = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 9.0, 9.0]])
    history = torch.tensor([[2.0, 2.0, 2.0, 2.0], [5.0, 1.0, 9.0, 9.5]])  # REL row 1: 4, 0, 0, 0.5
    selector = make_selector("x_adapt_rho", rho=0.6, gamma=1.0)
    keep = selector.select(Signals(response_mask=response, current_nll=current, history_nll=history,
                                   context_share=torch.zeros(2, 4)))
    assert keep[0].all()
    assert keep[1].nonzero().flatten().tolist() == [0, 3]
    assert selector.expected_kept(response) is None


def test_stuck_drops_hard_tokens_that_are_not_learnt_while_the_rest_is():
    response = torch.tensor([[False, True, True, True, True, True]])
    history = torch.tensor([[0.0, 3.0, 3.0, 3.0, 5.0, 1.0]])
    current = torch.tensor([[0.0, 1.0, 1.0, 1.0, 5.0, 1.0]])  # REL 2, 2, 2, 0, 0; median REL 2
    keep = make_selector("x_stuck").select(Signals(response_mask=response, current_nll=current, history_nll=history))
    # position 4: REL 0 < 1 and NLL 5 > median 1 → stuck; position 5: REL 0 but NLL 1 is not above the median
    assert keep[0].nonzero().flatten().tolist() == [1, 2, 3, 5]
    # nothing learnt yet (median REL 0): the sample is kept whole
    keep = make_selector("x_stuck").select(Signals(response_mask=response, current_nll=history, history_nll=history))
    assert keep[0].tolist() == response[0].tolist()


def test_midrel_drops_both_ends_of_rel():
    # REL 8, 0.5, 1, 0 → Norm 1, 0.0625, 0.125, 0 → |· − 0.5| 0.5, 0.4375, 0.375, 0.5: keeps 4 then 3 (ρ = 0.5)
    assert kept("x_midrel") == [3, 4]


def test_grounded_keeps_what_the_prompt_helps_most():
    no_prompt = torch.tensor([[0.0, 0.0, 9.5, 1.0, 7.0, 2.0]])  # minus HISTORY: 0.5, 0, 3, 0
    assert kept("x_grounded", reference_nll=no_prompt) == [2, 4]
    assert make_selector("x_grounded").needs_reference and make_selector("x_grounded").needs_history


def test_noprompt_cache_scores_the_response_without_the_prompt(tmp_path):
    from quality import build_noprompt_cache

    from sstoken.selection.nll_cache import sample_key
    from sstoken.testing import random_rows, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    start = tok.convert_tokens_to_ids("<|im_start|>")
    rows = random_rows([4], [3], seed=1)
    rows[0]["input_ids"][2] = start  # the assistant header starts at 2: the row is cut there
    model = tiny_model("llama")
    cache = build_noprompt_cache(model, tok, rows, tmp_path / "np", 64, "cpu")
    values = cache.get(sample_key(rows[0]["input_ids"]))
    assert values[:4].tolist() == [0.0] * 4 and (values[4:] > 0).all()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([rows[0]["input_ids"][2:]])).logits
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(rows[0]["input_ids"][3:]),
                                                 reduction="none")[1:]
    torch.testing.assert_close(values[4:], expected)


def test_quality_methods_run_sstoken_with_other_history_and_layer_settings():
    methods = selection_research.QUALITY_METHODS
    assert methods["x_sst_ema0.99_i10"] == {"selection_method": "sstoken", "history": "ema", "ema_decay": 0.99,
                                            "ema_interval": 10}
    assert methods["x_sst_layer0"]["attention_layer"] == 0 and methods["x_attn_layer0"]["selection_method"] == "attn"


def test_trainer_divides_by_the_kept_count_of_a_data_dependent_budget(tmp_path):
    from sstoken.errors import ConfigError
    from sstoken.testing import random_rows, tiny_trainer

    rows = random_rows([5, 6, 5, 7], [6, 5, 7, 6], seed=2)
    trainer = tiny_trainer(tmp_path / "out", rows, selection_method="x_adapt_outlier", max_steps=1,
                           per_device_train_batch_size=4)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert trainer._get_num_items_in_batch([batch], torch.device("cpu")) is None
    seen = []
    trainer.add_selection_listener(seen.append)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=None)
    event = seen[-1]
    expected = (event.signals.current_nll * event.keep).sum() / event.keep.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps 1"):
        trainer._get_num_items_in_batch([batch, batch], torch.device("cpu"))


def test_imperfect_oracle_drops_noise_and_clean_at_its_rates():
    response = torch.ones(1, 4000, dtype=torch.bool)
    noise = (torch.arange(4000) % 2).float().unsqueeze(0)  # every other token is noise
    selector = make_selector("x_oracle_r0.8_f0.2", seed=3)
    keep = selector.select(Signals(response_mask=response, current_nll=torch.ones(1, 4000), reference_nll=noise,
                                   draw_key=5))
    noisy = noise.bool()
    assert abs(1 - keep[noisy].float().mean().item() - 0.8) < 0.03  # recall
    assert abs(1 - keep[~noisy].float().mean().item() - 0.2) < 0.03  # false drops
    again = make_selector("x_oracle_r0.8_f0.2", seed=3).select(
        Signals(response_mask=response, current_nll=torch.ones(1, 4000), reference_nll=noise, draw_key=5))
    assert torch.equal(keep, again)  # same seed and micro-batch, same draw
    assert selector.expected_kept(response) is None
    exact = make_selector("x_oracle_r1.0_f0.4").select(
        Signals(response_mask=response, current_nll=torch.ones(1, 4000), reference_nll=noise, draw_key=0))
    assert not exact[noisy].any()


def test_noprompt_current_history_equals_the_noprompt_cache_of_the_same_model(tmp_path):
    from quality import build_noprompt_cache

    from sstoken.batch import pad_rows
    from sstoken.selection.nll_cache import sample_key
    from sstoken.selection.signals import BatchLayout
    from sstoken.testing import random_rows, tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    start = tok.convert_tokens_to_ids("<|im_start|>")
    rows = random_rows([4, 6], [3, 2], seed=4)
    rows[0]["input_ids"][1], rows[1]["input_ids"][4] = start, start
    model = tiny_model("llama")
    cache = build_noprompt_cache(model, tok, rows, tmp_path / "np", 64, "cpu")
    ids, labels, mask = pad_rows(rows, 0)
    inputs = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    source = selection_research.NoPromptCurrentHistory(start, 0)
    nll = source.nll(model, None, inputs, BatchLayout.of(inputs))
    for b, row in enumerate(rows):
        torch.testing.assert_close(nll[b, :len(row["input_ids"])], cache.get(sample_key(row["input_ids"])))
    assert make_selector("x_grounded_cur").needs_history and not make_selector("x_grounded_cur").needs_attention


def test_auc_and_false_drop_match_a_brute_force_count():
    noise = torch.tensor([3.0, 5.0, 2.0, 2.0])
    clean = torch.tensor([1.0, 2.0, 4.0])
    pairs = [(1.0 if n > c else 0.5 if n == c else 0.0) for n in noise.tolist() for c in clean.tolist()]
    assert selection_research.auc(noise, clean) == pytest.approx(sum(pairs) / len(pairs))
    assert selection_research.auc(torch.tensor([5.0, 6.0]), torch.tensor([1.0, 2.0])) == 1.0
    # dropping the top 50% of the noise (≥ 2.5 by the 0.5 quantile) drops the clean token 4.0
    assert selection_research.false_drop_at_recall(noise, clean, 0.5) == pytest.approx(1 / 3)


def test_full_probe_keeps_everything_but_asks_for_every_signal():
    selector = make_selector("x_full_probe", rho=0.3)
    assert selector.needs_history and selector.needs_attention and selector.needs_reference
    assert torch.equal(selector.select(signals()), RESPONSE)
    assert selector.expected_kept(RESPONSE) == 4


def test_plausible_global_keeps_the_lowest_base_nll_over_the_whole_training_set():
    from sstoken.selection.nll_cache import sample_key

    rows = [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8]}, {"input_ids": [9, 10, 11], "labels": [-100, 10, 11]}]
    base = {sample_key(rows[0]["input_ids"]): torch.tensor([0.0, 1.0, 5.0, 2.0]),
            sample_key(rows[1]["input_ids"]): torch.tensor([0.0, 4.0, 3.0])}

    class Cache:
        def get(self, key):
            return base[key]

    selector = make_selector("x_plausible_global", rho=0.6)
    selector.prepare(rows, Cache(), None)
    # base NLL of the 5 response tokens: 1, 5, 2, 4, 3 → the lowest ceil(0.6·5) = 3 are 1, 2, 3
    response = torch.tensor([[False, True, True, True], [False, True, True, False]])
    history = torch.tensor([[0.0, 1.0, 5.0, 2.0], [0.0, 4.0, 3.0, 0.0]])
    keep = selector.select(Signals(response_mask=response, current_nll=torch.zeros(2, 4), history_nll=history))
    assert keep.nonzero().tolist() == [[0, 1], [0, 3], [1, 2]]
    assert selector.expected_kept(response) is None


def test_lowrel_batch_keeps_the_lowest_rel_of_the_micro_batch():
    response = torch.tensor([[True, True, True], [True, True, False]])
    history = torch.tensor([[5.0, 5.0, 5.0], [5.0, 5.0, 0.0]])
    current = torch.tensor([[1.0, 4.9, 3.0], [4.0, 0.0, 0.0]])  # REL 4, 0.1, 2 | 1, 5
    selector = make_selector("x_lowrel_batch", rho=0.6)
    keep = selector.select(Signals(response_mask=response, current_nll=current, history_nll=history))
    assert keep.nonzero().tolist() == [[0, 1], [0, 2], [1, 0]]  # REL 0.1, 2, 1: the lowest 3 of 5
    assert selector.expected_kept(response) == 3


def test_research_summary_pairs_by_seed_with_a_t_interval():
    import research_summary

    mean, sd, _, hi = research_summary.ci([1.0, 2.0, 3.0])
    assert (mean, sd) == (2.0, 1.0) and hi - mean == pytest.approx(4.303 / 3 ** 0.5)
    records = [{"method": m, "seed": s, "nll": v, "kept": None}
               for m, vals in (("full_noisy", [2.0, 2.2, 2.1]), ("x", [1.9, 2.0, 2.0])) for s, v in enumerate(vals)]
    row = research_summary.table(records, ("full_noisy",)).splitlines()[-1]
    # paired differences -0.1, -0.2, -0.1: mean -0.133, 95% half-width 4.303·0.0577/√3 = 0.143 → no star
    assert row.startswith("| x | 3 | 1.967") and row.endswith("| -0.133 [-0.277, +0.010] |")


def test_the_prompt_is_cut_at_its_last_turn_header():
    from selection_research import last_turn_start

    assert last_turn_start([7, 1, 5, 7, 2, 3], 7) == 3  # the second header starts the response's turn
    assert last_turn_start([4, 5, 6], 7) == 2  # no header: only the last prompt token stays
    assert last_turn_start([], 7) == 0
