"""The EMA history's arithmetic: kept in float32 whatever the weights' dtype, so that bf16 weights still move it."""

from __future__ import annotations

import torch

from sstoken.selection.history import EMAHistory, history_forward_nll
from sstoken.testing import tiny_model

DECAY = 0.99
STEPS = 300
# float32 keeps ~7 digits; 300 multiply-adds lose at most a few units of the last one. A bf16 average (the
# weights' own dtype) rounds every update to 8 bits: its error is up to a bf16 step, 4e-3 relative.
TOLERANCE = 1e-5


def test_ema_of_bf16_weights_follows_a_float64_reference():
    """Many updates, each smaller than one bf16 step of the average: a bf16 average would never move."""
    model = torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    weight = model.weight
    ema = EMAHistory(model, DECAY)
    reference = weight.detach().double().clone()
    initial = reference.clone()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for step in range(1, STEPS + 1):
            # A drift of about half a bf16 step per update, plus noise: each update changes the average by far less
            # than a bf16 step, so it only ever moves when the average is kept wider than the weights.
            weight.add_((weight.abs() * 2.0**-9 + torch.randn(weight.shape, generator=gen) * 1e-3).to(weight.dtype))
            assert ema.update(step)
            reference.mul_(DECAY).add_(weight.double(), alpha=1.0 - DECAY)
    shadow = ema.shadow["weight"]
    error = (shadow.double() - reference).abs().max() / reference.abs().max()
    assert error < TOLERANCE, float(error)
    assert shadow.dtype == torch.float32 and weight.dtype == torch.bfloat16
    # The average really moved, by many bf16 steps, so the check is not vacuous.
    assert ((reference - initial).abs() / initial.abs().clamp(min=1e-3)).max() > 10 * 2.0**-8


def test_a_weight_held_one_bf16_step_away_is_averaged_in():
    """A weight moved by one bf16 step (1 → 1.0078125) and held: after 200 updates the float64 EMA is 1.006766."""
    model = torch.nn.Linear(1, 1, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMAHistory(model, DECAY)
    with torch.no_grad():
        model.weight.fill_(1.0078125)
    for step in range(1, 201):
        ema.update(step)
    expected = 1.0078125 - 0.0078125 * DECAY**200
    assert abs(float(ema.shadow["weight"]) - expected) < TOLERANCE * expected


def test_ema_forward_runs_bf16_weights_with_the_average_rounded_to_them():
    model = tiny_model("llama", seed=0).to(torch.bfloat16)
    ema = EMAHistory(model, 0.5)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.5)
    ema.update(1)
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "use_cache": False}
    nll = history_forward_nll(model, inputs, ids, ema=ema)
    rounded = {name: value.to(torch.bfloat16) for name, value in ema.shadow.items()}
    with torch.no_grad():
        expected = torch.func.functional_call(model, rounded, args=(), kwargs=inputs).logits
    from sstoken.selection import scoring

    torch.testing.assert_close(nll, scoring.token_nll(expected, ids, 1024))
