"""The attention warm-up: ssToken's γ schedule and what the selector keeps during and after it."""

from __future__ import annotations

import pytest
import torch

from sstoken.errors import ConfigError
from sstoken.selection.scoring import gamma_at
from sstoken.selection.selectors import Signals, make_selector


@pytest.mark.parametrize("progress, expected", [(0.0, 0.0), (0.19, 0.0), (0.2, 0.5), (0.7, 0.5), (1.0, 0.5)])
def test_gamma_is_zero_during_the_warmup_then_gamma(progress, expected):
    assert gamma_at(progress, gamma=0.5, warmup_fraction=0.2) == expected


def test_no_warmup_uses_gamma_from_the_first_step():
    assert gamma_at(0.0, gamma=0.7) == 0.7 and gamma_at(0.0, gamma=0.7, warmup_fraction=0.0) == 0.7


def test_sstoken_keeps_by_attention_during_the_warmup_and_by_the_combined_score_after():
    response = torch.tensor([[False, True, True, True, True]])
    # REL (history − current) prefers tokens 1 and 2; the attention share prefers tokens 3 and 4
    signals = Signals(response_mask=response, current_nll=torch.zeros(1, 5),
                      history_nll=torch.tensor([[0.0, 4.0, 3.0, 0.0, 0.0]]),
                      context_share=torch.tensor([[0.0, 0.1, 0.1, 0.9, 0.8]]))
    warm = make_selector("sstoken", rho=0.5, gamma=1.0, warmup_fraction=0.25)
    attention = make_selector("attn", rho=0.5)
    assert torch.equal(warm.select(signals, progress=0.1), attention.select(signals))
    assert warm.select(signals, progress=0.1).tolist() == [[False, False, False, True, True]]
    assert warm.select(signals, progress=0.25).tolist() == [[False, True, True, False, False]]
    assert warm.needs_attention and warm.needs_history  # γ = 1 still needs the share for its warm-up


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 2, "0.2", True])
def test_a_warmup_outside_zero_to_one_is_refused(fraction):
    with pytest.raises(ConfigError, match="attention_warmup must be in"):
        make_selector("sstoken", warmup_fraction=fraction)
