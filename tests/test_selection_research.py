"""The experimental selectors of benchmarks/selection_research.py, on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

import selection_research
from sstoken.selection import SELECTORS, Signals, make_selector

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
