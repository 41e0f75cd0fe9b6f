"""Tests of sstoken.selection.scoring: pure tensor maths of ssToken token selection.

Expected values are computed by hand; the arithmetic is in the comments next to each assertion.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sstoken.batch import IGNORE_INDEX
from sstoken.selection.scoring import (
    combined_score,
    combined_weights,
    dft_weights,
    excess_loss,
    global_threshold,
    keep_count,
    keep_counts,
    masked_mean,
    minmax_normalize,
    random_mask,
    response_mask_from_labels,
    retrospective_excess_loss,
    sstoken_mask,
    sstoken_scores,
    step_mean,
    threshold_mask,
    token_nll,
    top_rho_mask,
    weighted_sum,
)

NAN = float("nan")
INF = float("inf")


def t(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


def b(rows):
    return torch.tensor(rows, dtype=torch.bool)


def close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    """Same shape and every entry within ``atol`` (torch.testing.assert_close costs ~1 s of lazy imports)."""
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.allclose(actual, expected, rtol=0.0, atol=atol), (actual.tolist(), expected.tolist())


def positions(mask_row: torch.Tensor) -> list[int]:
    return torch.nonzero(mask_row).flatten().tolist()


# ----------------------------------------------------------------------------------------------------------------
# response_mask_from_labels
# ----------------------------------------------------------------------------------------------------------------


def test_response_mask_from_labels():
    labels = torch.tensor([[5, 7, -100, 9], [-100, -100, 3, -100]])
    mask = response_mask_from_labels(labels)
    # row 0: col 0 is never predicted → False even though its label is 5; col 2 is -100 → False
    # row 1: only col 2 carries a label
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[False, True, False, True], [False, False, True, False]]
    # the labels themselves are not modified
    assert labels.tolist() == [[5, 7, -100, 9], [-100, -100, 3, -100]]


# ----------------------------------------------------------------------------------------------------------------
# token_nll
# ----------------------------------------------------------------------------------------------------------------


def test_token_nll_hand_computed_v3():
    # logits 1×3×3. Position i predicts token i+1, so the NLL at entry i uses the logits at i-1.
    logits = torch.tensor(
        [
            [
                [math.log(1.0), math.log(2.0), math.log(5.0)],  # softmax = [1/8, 2/8, 5/8]
                [math.log(3.0), math.log(1.0), math.log(4.0)],  # softmax = [3/8, 1/8, 4/8]
                [100.0, -100.0, 5.0],  # last position predicts nothing: must not be used
            ]
        ]
    )
    labels = torch.tensor([[1, 2, 1]])
    nll = token_nll(logits, labels)
    assert nll.shape == (1, 3)
    assert nll.dtype == torch.float32
    # entry 0: nothing predicts token 0 → 0
    # entry 1: token 2 from logits[0]: -log(5/8) = log(8/5) = log 1.6 ≈ 0.470004
    # entry 2: token 1 from logits[1]: -log(1/8) = log 8 ≈ 2.079442
    expected = [0.0, math.log(8 / 5), math.log(8.0)]
    assert nll[0].tolist() == pytest.approx(expected, abs=1e-6)
    # and the same from a log-softmax written out by hand with exp/log
    row0 = [0.0, 1.0, 2.0]
    lse = math.log(math.exp(0.0) + math.exp(1.0) + math.exp(2.0))  # log(1 + e + e²) ≈ 2.407606
    nll2 = token_nll(torch.tensor([[row0, [0.0, 0.0, 0.0], [9.0, 9.0, 9.0]]]), torch.tensor([[0, 2, 0]]))
    # entry 1: -(2 - lse) = lse - 2 ≈ 0.407606 ; entry 2: uniform logits → log 3 ≈ 1.098612
    assert nll2[0].tolist() == pytest.approx([0.0, lse - 2.0, math.log(3.0)], abs=1e-6)


def test_token_nll_ignore_index_and_column_zero():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, 2] = IGNORE_INDEX
    labels[1, 4] = IGNORE_INDEX
    labels[1, 0] = IGNORE_INDEX
    nll = token_nll(logits, labels)
    assert nll[:, 0].tolist() == [0.0, 0.0]  # column 0 is always 0 (label set or not)
    assert nll[0, 2].item() == 0.0  # label -100 → 0
    assert nll[1, 4].item() == 0.0
    # every other entry is strictly positive (a finite softmax never gives probability 1)
    others = torch.ones(2, 5, dtype=torch.bool)
    others[:, 0] = False
    others[0, 2] = False
    others[1, 4] = False
    assert bool((nll[others] > 0).all())


def test_token_nll_alignment_random():
    torch.manual_seed(1)
    batch, length, vocab = 3, 6, 11
    logits = torch.randn(batch, length, vocab) * 3
    labels = torch.randint(0, vocab, (batch, length))
    nll = token_nll(logits, labels)
    logp = torch.log_softmax(logits.double(), dim=-1).tolist()
    lab = labels.tolist()
    got = nll.tolist()
    for row in range(batch):
        for i in range(1, length):
            expected = -logp[row][i - 1][lab[row][i]]  # NLL of token i from the logits at i−1
            assert got[row][i] == pytest.approx(expected, abs=1e-5)
    # and the usual shifted cross-entropy
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), reduction="none")
    close(nll[:, 1:], ce.view(batch, length - 1), atol=1e-5)


def test_token_nll_chunk_size_does_not_matter():
    torch.manual_seed(2)
    logits = torch.randn(3, 9, 13)
    labels = torch.randint(0, 13, (3, 9))
    labels[1, 3] = IGNORE_INDEX
    ref = token_nll(logits, labels, chunk_size=1024)
    for chunk in (1, 2, 5, 24, 25):  # 24 = B·(T-1): exactly one chunk; 5 does not divide 24
        close(token_nll(logits, labels, chunk_size=chunk), ref, atol=1e-6)


def test_token_nll_no_grad():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.randint(0, 5, (2, 4))
    nll = token_nll(logits, labels)
    assert not nll.requires_grad
    assert nll.grad_fn is None


def test_token_nll_bf16_logits():
    torch.manual_seed(3)
    logits = torch.randn(2, 5, 17).to(torch.bfloat16)
    labels = torch.randint(0, 17, (2, 5))
    nll = token_nll(logits, labels, chunk_size=3)
    assert nll.dtype == torch.float32
    assert bool(torch.isfinite(nll).all())
    # computed in float32 from the bf16 values
    ref = token_nll(logits.float(), labels)
    close(nll, ref, atol=1e-6)


def test_token_nll_length_one():
    nll = token_nll(torch.randn(2, 1, 4), torch.tensor([[1], [2]]))
    assert nll.shape == (2, 1)
    assert nll.tolist() == [[0.0], [0.0]]


# ----------------------------------------------------------------------------------------------------------------
# REL and excess loss
# ----------------------------------------------------------------------------------------------------------------


def test_retrospective_excess_loss_sign():
    history = t([[3.0, 1.0, 2.0]])
    current = t([[1.0, 2.0, 2.0]])
    # REL = history − current: [3−1, 1−2, 2−2] = [2, −1, 0]; positive = learnt lately
    assert retrospective_excess_loss(history, current).tolist() == [[2.0, -1.0, 0.0]]


def test_excess_loss_sign():
    current = t([[3.0, 1.0, 2.0]])
    reference = t([[1.0, 2.0, 2.0]], dtype=torch.float64)
    out = excess_loss(current, reference)
    # Rho-1: current − reference = [3−1, 1−2, 2−2] = [2, −1, 0]
    assert out.tolist() == [[2.0, -1.0, 0.0]]
    assert out.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------------
# minmax_normalize
# ----------------------------------------------------------------------------------------------------------------


def test_minmax_hand_case():
    values = t([[7.0, 2.0, 4.0, 10.0, 6.0]])
    mask = b([[False, True, True, True, True]])
    # response values 2, 4, 10, 6: min 2, max 10, span 8 → (v−2)/8 = 0, 0.25, 1, 0.5 ; col 0 outside → 0
    out = minmax_normalize(values, mask)
    close(out, [[0.0, 0.0, 0.25, 1.0, 0.5]], atol=1e-7)


def test_minmax_all_equal_is_zero_not_nan():
    out = minmax_normalize(t([[3.0, 3.0, 3.0, 3.0]]), b([[False, True, True, True]]))
    # span 0 → every response token maps to 0 (no 0/0)
    assert not bool(torch.isnan(out).any())
    assert out.tolist() == [[0.0, 0.0, 0.0, 0.0]]


def test_minmax_single_response_token_is_zero():
    out = minmax_normalize(t([[1.0, 5.0, 9.0]]), b([[False, True, False]]))
    assert out.tolist() == [[0.0, 0.0, 0.0]]


def test_minmax_outside_mask_ignored():
    # huge values outside the mask must neither appear in the output nor change min/max
    values = t([[-1e30, 1.0, 3.0, 1e30, 2.0, float("inf")]])
    mask = b([[False, True, True, False, True, False]])
    out = minmax_normalize(values, mask)
    # response values 1, 3, 2: min 1, max 3, span 2 → 0, 1, 0.5
    close(out, [[0.0, 0.0, 1.0, 0.0, 0.5, 0.0]], atol=1e-7)


def test_minmax_inf_and_nan_in_response_do_not_produce_nan():
    values = t([[0.0, 1.0, INF, 3.0, 5.0, -INF, NAN]])
    mask = b([[False, True, True, True, True, True, True]])
    out = minmax_normalize(values, mask)
    assert bool(torch.isfinite(out).all())
    assert bool(((out >= 0) & (out <= 1)).all())
    # the finite values 1, 3, 5 are normalised among themselves: (v−1)/4 = 0, 0.5, 1
    assert out[0, 1].item() == pytest.approx(0.0)
    assert out[0, 3].item() == pytest.approx(0.5)
    assert out[0, 4].item() == pytest.approx(1.0)
    # a sample whose only values are non-finite
    out2 = minmax_normalize(t([[0.0, INF, -INF]]), b([[False, True, True]]))
    assert out2.tolist() == [[0.0, 0.0, 0.0]]


def test_minmax_rows_independent():
    values = t([[0.0, 1.0, 3.0, 5.0], [0.0, 100.0, 200.0, 150.0]])
    mask = b([[False, True, True, True], [False, True, True, True]])
    out = minmax_normalize(values, mask)
    # row 0: min 1 max 5 → (1−1)/4, (3−1)/4, (5−1)/4 = 0, .5, 1
    # row 1: min 100 max 200 → 0, 1, .5
    close(out, [[0.0, 0.0, 0.5, 1.0], [0.0, 0.0, 1.0, 0.5]], atol=1e-7)
    # a row with no response token is all zeros and leaves the other row intact
    mask2 = b([[False, True, True, True], [False, False, False, False]])
    out2 = minmax_normalize(values, mask2)
    close(out2, [[0.0, 0.0, 0.5, 1.0], [0.0, 0.0, 0.0, 0.0]], atol=1e-7)


def test_minmax_packed_segments_normalised_separately():
    values = t([[0.0, 10.0, 20.0, 0.0, 200.0, 300.0, 250.0]])
    mask = b([[False, True, True, False, True, True, True]])
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    out = minmax_normalize(values, mask, segments)
    # segment 0: 10, 20 → 0, 1 ; segment 1: 200, 300, 250 → 0, 1, .5
    close(out, [[0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.5]], atol=1e-7)
    # without segments: min 10, max 300, span 290 → 20 → 10/290, 200 → 190/290
    flat = minmax_normalize(values, mask)
    assert flat[0, 2].item() == pytest.approx(10 / 290, abs=1e-6)
    assert flat[0, 4].item() == pytest.approx(190 / 290, abs=1e-6)
    # segment ids need not start at 0, and may differ per row
    shifted = minmax_normalize(values, mask, segments + 5)
    close(shifted, out, atol=0.0)


# ----------------------------------------------------------------------------------------------------------------
# combined_score / sstoken_scores
# ----------------------------------------------------------------------------------------------------------------


def test_combined_score_hand():
    rel = t([[0.0, 1.0, 0.5]])
    share = t([[0.4, 0.0, 0.2]])
    # γ=0.5: .5·rel + .5·share = [.2, .5, .35]
    close(combined_score(rel, share, 0.5), [[0.2, 0.5, 0.35]], atol=1e-6)
    # γ=0.25: .25·rel + .75·share = [.3, .25, .125 + .15 = .275]
    close(combined_score(rel, share, 0.25), [[0.3, 0.25, 0.275]], atol=1e-6)
    close(combined_score(rel, share, 0.0), share, atol=1e-6)
    close(combined_score(rel, share, 1.0), rel, atol=1e-6)


# The worked example: history [·,3,2,1,5], current [·,1,1,1,1], share [·,.5,.1,.9,.2].
HIST = t([[9.0, 3.0, 2.0, 1.0, 5.0]])
CUR = t([[0.0, 1.0, 1.0, 1.0, 1.0]])
SHARE = t([[0.8, 0.5, 0.1, 0.9, 0.2]])
RESP = b([[False, True, True, True, True]])


def test_sstoken_scores_hand_gamma_half():
    # REL = [·, 2, 1, 0, 4]; over the response: min 0, max 4 → Norm = [·, .5, .25, 0, 1]
    # score = .5·Norm + .5·share = [·, .25+.25, .125+.05, 0+.45, .5+.1] = [·, .5, .175, .45, .6]; col 0 → 0
    scores = sstoken_scores(HIST, CUR, SHARE, RESP, gamma=0.5)
    close(scores, [[0.0, 0.5, 0.175, 0.45, 0.6]], atol=1e-6)


def test_sstoken_scores_gamma_zero_is_attention():
    scores = sstoken_scores(HIST, CUR, SHARE, RESP, gamma=0.0)
    # pure attention on the response; the context column's share .8 is zeroed
    close(scores, [[0.0, 0.5, 0.1, 0.9, 0.2]], atol=1e-7)


def test_sstoken_scores_gamma_one_is_rel():
    scores = sstoken_scores(HIST, CUR, SHARE, RESP, gamma=1.0)
    # pure Norm(REL) = [·, .5, .25, 0, 1]
    close(scores, [[0.0, 0.5, 0.25, 0.0, 1.0]], atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# keep_count / keep_counts
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "rho", "expected"),
    [
        (10, 0.7, 7),  # 7 exactly
        (5, 0.6, 3),  # 3 exactly
        (30, 0.1, 3),  # 3 exactly
        (100, 0.07, 7),  # 0.07·100 = 7.000000000000001 in binary floating point: must stay 7
        (50, 0.14, 7),  # 7.000000000000001
        (100, 0.28, 28),  # 28.000000000000004
        (100, 0.55, 55),  # 55.00000000000001
        (100, 0.29, 29),  # 28.999999999999996 → ceil 29
        (4, 0.6, 3),  # 2.4 → 3
        (10, 0.25, 3),  # 2.5 → 3
        (10, 0.01, 1),  # 0.1 → 1: a non-empty sample always keeps something
        (1, 0.5, 1),  # 0.5 → 1
        (7, 1.0, 7),  # ρ = 1 keeps everything
        (1, 1.0, 1),
        (0, 0.5, 0),  # nothing to keep
        (0, 1.0, 0),
    ],
)
def test_keep_count(n, rho, expected):
    assert keep_count(n, rho) == expected


def test_keep_counts_per_row():
    mask = torch.zeros(3, 100, dtype=torch.bool)
    mask[0, 1:11] = True  # n = 10
    mask[1, :100] = True  # n = 100
    # row 2: n = 0
    counts = keep_counts(mask, 0.7)
    # ceil(.7·10) = 7, ceil(.7·100) = 70 (0.7·100 = 70.0), 0
    assert counts.tolist() == [7, 70, 0]
    assert keep_counts(mask, 0.07).tolist() == [1, 7, 0]  # ceil(.7) = 1, 0.07·100 = 7.000000000000001 → 7


def test_keep_counts_per_segment():
    mask = b([[False, True, True, True, False, True, True], [False, True, True, True, True, True, True]])
    segments = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]])
    counts = keep_counts(mask, 0.5, segments)
    # groups: (row0, seg0) n=3 → ceil(1.5)=2 ; (row0, seg1) n=2 → 1 ;
    #         (row1, seg0) n=6 → 3 ; (row1, seg1) empty → 0
    assert counts.tolist() == [2, 1, 3, 0]


# ----------------------------------------------------------------------------------------------------------------
# top_rho_mask
# ----------------------------------------------------------------------------------------------------------------


def test_top_rho_mask_hand():
    scores = t([[9.0, 0.3, 0.9, 0.1, 0.5, 0.7]])
    mask = b([[False, True, True, True, True, True]])
    # n = 5, ρ = .6 → 3 kept: .9 (pos 2), .7 (pos 5), .5 (pos 4); context pos 0 (score 9) never kept
    keep = top_rho_mask(scores, mask, 0.6)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [[False, False, True, False, True, True]]


def test_top_rho_mask_ties_earlier_position_wins():
    scores = t([[1.0, 1.0, 1.0, 1.0, 1.0]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    # n = 5, ρ = .4 → 2: all tied → positions 0, 1
    assert positions(top_rho_mask(scores, mask, 0.4)[0]) == [0, 1]
    scores2 = t([[0.5, 0.9, 0.5, 0.5, 0.1]])
    # ρ = .6 → 3: .9 (pos 1), then the tie at .5 among 0, 2, 3 → 0, 2
    assert positions(top_rho_mask(scores2, mask, 0.6)[0]) == [0, 1, 2]
    # tie straddling the cut where the earlier tied token is outside the mask: it must not be counted
    mask3 = b([[False, True, True, True, True]])
    # response 1..4 scores .9, .5, .5, .1; n = 4, ρ = .5 → 2: pos 1, then pos 2 (earlier of the tie 2/3)
    assert positions(top_rho_mask(scores2, mask3, 0.5)[0]) == [1, 2]


def test_top_rho_mask_nan_ranks_last():
    scores = t([[NAN, 0.1, 0.2, NAN, -5.0]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    # n = 5; ρ = .6 → 3: the three finite scores .2, .1, −5 (positions 1, 2, 4)
    assert positions(top_rho_mask(scores, mask, 0.6)[0]) == [1, 2, 4]
    # ρ = .8 → 4: the finite three, then the earlier NaN (pos 0)
    assert positions(top_rho_mask(scores, mask, 0.8)[0]) == [0, 1, 2, 4]


def test_top_rho_mask_nan_ranks_below_minus_inf():
    scores = t([[NAN, -INF]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    # n = 2, ρ = .5 → 1: the -inf token (pos 1) ranks above NaN
    assert positions(top_rho_mask(scores, mask, 0.5)[0]) == [1]


def test_top_rho_mask_empty_rows_keep_nothing():
    scores = t([[0.9, 0.8, 0.7], [0.1, 0.2, 0.3]])
    mask = b([[False, False, False], [False, True, True]])
    keep = top_rho_mask(scores, mask, 1.0)
    assert keep.tolist() == [[False, False, False], [False, True, True]]


def test_top_rho_mask_segments():
    # one packed row of two samples; the second has much higher scores
    scores = t([[0.0, 0.1, 0.3, 0.2, 0.0, 0.9, 0.8, 0.7, 0.95]])
    mask = b([[False, True, True, True, False, True, True, True, True]])
    segments = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1]])
    keep = top_rho_mask(scores, mask, 0.5, segments)
    # seg 0: n=3 → ceil(1.5)=2: .3 (pos 2), .2 (pos 3) ; seg 1: n=4 → 2: .95 (pos 8), .9 (pos 5)
    assert positions(keep[0]) == [2, 3, 5, 8]
    # without segments: n=7 → ceil(3.5)=4 → the four best overall: .95, .9, .8, .7 (all in sample 2)
    assert positions(top_rho_mask(scores, mask, 0.5)[0]) == [5, 6, 7, 8]


def test_segment_ids_are_relative_per_row():
    # segment ids are only labels: any per-row offset (even negative) selects the same samples
    scores = t([[0.0, 0.1, 0.3, 0.2, 0.0, 0.9, 0.8], [0.0, 0.5, 0.4, 0.0, 0.1, 0.2, 0.3]])
    mask = b([[False, True, True, True, False, True, True], [False, True, True, False, True, True, True]])
    zero_based = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1]])
    offset = zero_based + torch.tensor([[-3], [10]])  # row 0: -3,-2 ; row 1: 10, 11
    ref = top_rho_mask(scores, mask, 0.5, zero_based)
    # row 0 seg 0: .1,.3,.2 → 2: pos 2,3 ; seg 1: .9,.8 → 1: pos 5
    # row 1 seg 0: .5,.4 → 1: pos 1 ; seg 1: .1,.2,.3 → 2: pos 5,6
    assert ref.tolist() == [
        [False, False, True, True, False, True, False],
        [False, True, False, False, False, True, True],
    ]
    assert torch.equal(top_rho_mask(scores, mask, 0.5, offset), ref)
    # keep_counts: (row, seg) groups numbered per row from each row's smallest id → [2, 1, 1, 2] either way
    assert keep_counts(mask, 0.5, zero_based).tolist() == [2, 1, 1, 2]
    assert keep_counts(mask, 0.5, offset).tolist() == [2, 1, 1, 2]
    close(minmax_normalize(scores, mask, offset), minmax_normalize(scores, mask, zero_based), atol=0.0)


@pytest.mark.parametrize("rho", [0.0, -0.1, 1.0001, 2.0, NAN])
def test_top_rho_mask_bad_rho(rho):
    with pytest.raises(ValueError):
        top_rho_mask(t([[0.1, 0.2]]), b([[True, True]]), rho)


def test_top_rho_mask_property_random():
    gen = torch.Generator().manual_seed(1234)
    for trial in range(150):
        batch = int(torch.randint(1, 5, (1,), generator=gen))
        length = int(torch.randint(1, 40, (1,), generator=gen))
        rho = float(torch.randint(1, 101, (1,), generator=gen)) / 100  # 0.01 … 1.00
        mask = torch.rand(batch, length, generator=gen) < 0.7
        # coarse scores → many ties
        scores = torch.randint(0, 5, (batch, length), generator=gen).float()
        use_segments = trial % 2 == 1
        segments = None
        if use_segments:
            starts = torch.rand(batch, length, generator=gen) < 0.2
            starts[:, 0] = False
            segments = starts.long().cumsum(1)
        keep = top_rho_mask(scores, mask, rho, segments)
        assert keep.dtype == torch.bool and keep.shape == mask.shape
        assert not bool((keep & ~mask).any()), "kept a context/pad token"
        seg = (segments if segments is not None else torch.zeros(batch, length, dtype=torch.long)).tolist()
        m, k, sc = mask.tolist(), keep.tolist(), scores.tolist()
        for row in range(batch):
            for s in set(seg[row]):
                members = [i for i in range(length) if seg[row][i] == s and m[row][i]]
                kept = [i for i in members if k[row][i]]
                assert len(kept) == keep_count(len(members), rho)
                # reference ranking: score descending, then position ascending
                ranked = sorted(members, key=lambda i: (-sc[row][i], i))
                assert kept == sorted(ranked[: len(kept)])
        assert keep_counts(mask, rho, segments).sum().item() == int(keep.sum())


def test_top_rho_mask_exact_count_floating_rho():
    # 0.07·100 = 7.000000000000001: exactly 7, not 8
    torch.manual_seed(4)
    scores = torch.rand(1, 101)
    mask = torch.ones(1, 101, dtype=torch.bool)
    mask[0, 0] = False
    assert int(top_rho_mask(scores, mask, 0.07).sum()) == 7
    assert int(top_rho_mask(scores, mask, 0.55).sum()) == 55
    assert int(top_rho_mask(scores[:, :11], mask[:, :11], 0.7).sum()) == 7


# ----------------------------------------------------------------------------------------------------------------
# sstoken_mask
# ----------------------------------------------------------------------------------------------------------------


def test_sstoken_mask_hand_example():
    # scores [·, .5, .175, .45, .6] (see test_sstoken_scores_hand_gamma_half); n=4, ρ=.6 → ceil(2.4)=3
    # ranking .6 (pos 4) > .5 (pos 1) > .45 (pos 3) > .175 (pos 2) → keep 1, 3, 4
    keep = sstoken_mask(HIST, CUR, SHARE, RESP, gamma=0.5, rho=0.6)
    assert keep.tolist() == [[False, True, False, True, True]]


def test_sstoken_mask_gamma_extremes():
    # γ=0: share [·, .5, .1, .9, .2] → top 3: .9 (3), .5 (1), .2 (4)
    assert positions(sstoken_mask(HIST, CUR, SHARE, RESP, gamma=0.0, rho=0.6)[0]) == [1, 3, 4]
    # γ=1: Norm(REL) [·, .5, .25, 0, 1] → top 3: 1 (4), .5 (1), .25 (2)
    assert positions(sstoken_mask(HIST, CUR, SHARE, RESP, gamma=1.0, rho=0.6)[0]) == [1, 2, 4]
    # ρ=.5 → 2 tokens at γ=.5: .6 (4), .5 (1)
    assert positions(sstoken_mask(HIST, CUR, SHARE, RESP, gamma=0.5, rho=0.5)[0]) == [1, 4]


@pytest.mark.parametrize("gamma", [-0.01, 1.01, NAN])
def test_sstoken_mask_bad_gamma(gamma):
    with pytest.raises(ValueError):
        sstoken_mask(HIST, CUR, SHARE, RESP, gamma=gamma)


def test_sstoken_mask_bad_rho():
    with pytest.raises(ValueError):
        sstoken_mask(HIST, CUR, SHARE, RESP, rho=0.0)


def _random_inputs(seed, batch=3, length=20):
    gen = torch.Generator().manual_seed(seed)
    hist = torch.rand(batch, length, generator=gen) * 5
    cur = torch.rand(batch, length, generator=gen) * 5
    share = torch.rand(batch, length, generator=gen)
    mask = torch.rand(batch, length, generator=gen) < 0.8
    mask[:, 0] = False
    return hist, cur, share, mask


def test_sstoken_mask_invariant_to_constant_shift():
    hist, cur, share, mask = _random_inputs(5)
    ref = sstoken_mask(hist, cur, share, mask, gamma=0.5, rho=0.4)
    # REL = (h + c) − (x + c) = h − x
    shifted = sstoken_mask(hist + 7.25, cur + 7.25, share, mask, gamma=0.5, rho=0.4)
    assert torch.equal(ref, shifted)
    # sanity: the mask is not trivial (some tokens dropped, some kept)
    assert 0 < int(ref.sum()) < int(mask.sum())


def test_sstoken_mask_invariant_to_rel_scale_at_gamma_one():
    hist, cur, share, mask = _random_inputs(6)
    ref = sstoken_mask(hist, cur, share, mask, gamma=1.0, rho=0.5)
    # REL scaled by c > 0 → the same min-max normalisation
    for c in (2.0, 3.7, 0.01):
        assert torch.equal(ref, sstoken_mask(hist * c, cur * c, share, mask, gamma=1.0, rho=0.5))
    # at γ=1 the attention share is irrelevant
    assert torch.equal(ref, sstoken_mask(hist, cur, torch.rand_like(share), mask, gamma=1.0, rho=0.5))
    # but a negative scale reverses the ranking: the mask changes
    assert not torch.equal(ref, sstoken_mask(-hist, -cur, share, mask, gamma=1.0, rho=0.5))


def test_sstoken_mask_packed_equals_separate_rows():
    hist, cur, share, mask = _random_inputs(7, batch=2, length=12)
    len_a, len_b = 12, 9
    mask[1, len_b:] = False  # row 1 is padded after 9 tokens
    packed = lambda x: torch.cat([x[0, :len_a], x[1, :len_b]]).unsqueeze(0)  # noqa: E731
    segments = torch.tensor([[0] * len_a + [1] * len_b])
    for gamma, rho in ((0.5, 0.6), (0.0, 0.3), (1.0, 0.9), (0.3, 1.0)):
        sep = sstoken_mask(hist, cur, share, mask, gamma=gamma, rho=rho)
        pk = sstoken_mask(packed(hist), packed(cur), packed(share), packed(mask), gamma, rho, segments)
        assert torch.equal(pk, packed(sep))
        sep_scores = sstoken_scores(hist, cur, share, mask, gamma)
        pk_scores = sstoken_scores(packed(hist), packed(cur), packed(share), packed(mask), gamma, segments)
        close(pk_scores, packed(sep_scores), atol=1e-6)
    # and without segment_ids the packed row is normalised/selected as one sample: different masks
    flat = sstoken_mask(packed(hist), packed(cur), packed(share), packed(mask), 0.5, 0.6)
    seg = sstoken_mask(packed(hist), packed(cur), packed(share), packed(mask), 0.5, 0.6, segments)
    assert int(flat.sum()) == keep_count(int(mask.sum()), 0.6)
    assert int(seg.sum()) == keep_count(int(mask[0].sum()), 0.6) + keep_count(int(mask[1].sum()), 0.6)


# ----------------------------------------------------------------------------------------------------------------
# random_mask
# ----------------------------------------------------------------------------------------------------------------


def test_random_mask_counts_and_reproducibility():
    mask = torch.zeros(3, 50, dtype=torch.bool)
    mask[0, 1:41] = True  # n = 40
    mask[1, 5:15] = True  # n = 10
    # row 2 empty
    keep = random_mask(mask, 0.3, generator=torch.Generator().manual_seed(0))
    # ceil(.3·40) = 12, ceil(.3·10) = 3 (0.3·10 = 3.0), 0
    assert keep.sum(1).tolist() == [12, 3, 0]
    assert not bool((keep & ~mask).any())
    same = random_mask(mask, 0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(keep, same)
    other = random_mask(mask, 0.3, generator=torch.Generator().manual_seed(1))
    assert other.sum(1).tolist() == [12, 3, 0]
    assert not torch.equal(keep, other)


def test_random_mask_segments():
    mask = torch.ones(1, 30, dtype=torch.bool)
    segments = torch.tensor([[0] * 10 + [1] * 20])
    keep = random_mask(mask, 0.5, generator=torch.Generator().manual_seed(3), segment_ids=segments)
    # ceil(.5·10) = 5 in segment 0, ceil(.5·20) = 10 in segment 1
    assert int(keep[0, :10].sum()) == 5
    assert int(keep[0, 10:].sum()) == 10


# ----------------------------------------------------------------------------------------------------------------
# threshold_mask / global_threshold / masked_mean
# ----------------------------------------------------------------------------------------------------------------


def test_threshold_mask_hand():
    scores = t([[0.9, 0.5, 0.25, 0.75], [0.5, 0.125, 1.0, 0.5]])
    mask = b([[False, True, True, True], [True, True, True, False]])
    keep = threshold_mask(scores, mask, 0.5)
    # ≥ .5 and in the mask: row 0 → pos 1 (.5, equality kept), pos 3 (.75); pos 0 (.9) is context
    # row 1 → pos 0 (.5), pos 2 (1.0); pos 3 (.5) is padding
    assert keep.tolist() == [[False, True, False, True], [True, False, True, False]]


def test_global_threshold_hand():
    scores = t([0.125, 0.5, 0.25, 0.5, 0.875])
    # n=5, ρ=.4 → k=ceil(2)=2 → top-2 values .875, .5 → threshold .5
    assert global_threshold(scores, 0.4) == 0.5
    # threshold_mask with ties kept: .5, .5, .875 → 3 tokens
    keep = threshold_mask(scores.unsqueeze(0), torch.ones(1, 5, dtype=torch.bool), global_threshold(scores, 0.4))
    assert keep.tolist() == [[False, True, False, True, True]]
    # ρ=.2 → k=1 → .875 ; ρ=1 → k=5 → the minimum .125 ; ρ=.7 → ceil(3.5)=4 → .25
    assert global_threshold(scores, 0.2) == 0.875
    assert global_threshold(scores, 1.0) == 0.125
    assert global_threshold(scores, 0.7) == 0.25
    # 2-D input is flattened
    assert global_threshold(scores.view(1, 5), 0.4) == 0.5
    # empty → +inf (keeps nothing)
    assert global_threshold(torch.empty(0), 0.5) == INF


def test_masked_mean():
    values = t([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    mask = b([[True, False, True, False], [False, False, False, True]])
    # (1 + 3 + 40) / 3 = 44/3 ≈ 14.6667
    out = masked_mean(values, mask)
    assert isinstance(out, float)
    assert out == pytest.approx(44 / 3)
    assert masked_mean(values, torch.zeros_like(mask)) == 0.0
    assert masked_mean(values, torch.ones_like(mask)) == pytest.approx(110 / 8)  # 1+2+3+4+10+20+30+40 = 110


def test_minmax_treats_rounding_level_spread_as_constant():
    # history = current + 0.75 in float32: REL is 0.75 up to rounding, so nothing should be ranked by it
    torch.manual_seed(0)
    current = torch.rand(1, 64) * 8
    history = current + 0.75
    mask = torch.ones(1, 64, dtype=torch.bool)
    rel = retrospective_excess_loss(history, current)
    assert rel.max() != rel.min()  # rounding did leave a spread
    assert minmax_normalize(rel, mask).abs().max().item() == 0.0
    # a small but real spread is still ranked: 0, 1e-4, 2e-4 -> 0, .5, 1
    small = minmax_normalize(t([[0.0, 1e-4, 2e-4]]), torch.ones(1, 3, dtype=torch.bool))
    assert small[0].tolist() == pytest.approx([0.0, 0.5, 1.0])


# ----------------------------------------------------------------------------------------------- token weights
def test_dft_weight_is_the_probability_of_the_label():
    # NLL 0 → p 1; NLL ln 2 → p 1/2; NLL ln 4 → p 1/4
    nll = t([[0.0, math.log(2.0), math.log(4.0)]])
    assert dft_weights(nll)[0].tolist() == pytest.approx([1.0, 0.5, 0.25])
    # a constant of the backward, even for an NLL that has a gradient
    assert not dft_weights(nll.clone().requires_grad_()).requires_grad


def test_combined_weights_multiply_the_given_factors():
    data, dft = t([[2.0, 0.5, 1.0]]), t([[0.5, 0.5, 0.25]])
    assert combined_weights(data, None, dft)[0].tolist() == pytest.approx([1.0, 0.25, 0.25])  # 2·.5, .5·.5, 1·.25
    assert combined_weights(data)[0].tolist() == [2.0, 0.5, 1.0]
    assert combined_weights(None, None) is None


def test_weighted_sum():
    nll = t([1.0, 2.0, 4.0])
    assert weighted_sum(nll).item() == 7.0  # no weights: the plain sum
    assert weighted_sum(nll, t([0.5, 1.0, 0.25])).item() == 3.5  # .5 + 2 + 1


def test_step_mean_divides_by_the_kept_count_of_the_step_not_the_weights():
    keep = b([[False, True, True], [False, True, False]])  # 3 kept tokens in this micro-batch
    # Its own count when the micro-batch is the step: 6 / 3
    assert step_mean(t(6.0), None, keep).item() == 2.0
    # The step's count when it is one of several micro-batches (12 kept in the step): 6 / 12
    assert step_mean(t(6.0), 12, keep).item() == 0.5
    # A step that keeps nothing: 0, not 0/0
    assert step_mean(t(0.0), 0, torch.zeros_like(keep)).item() == 0.0


def test_weighted_step_loss_is_the_same_split_in_micro_batches():
    # One step: weighted NLL 1·2 + 0.5·4 + 2·1 + 1·3 = 9 over 4 kept tokens → 2.25, whether as one batch or as two
    # micro-batches (2 + 2)/4 + (2 + 3)/4 = 1 + 1.25.
    nll, w = t([2.0, 4.0, 1.0, 3.0]), t([1.0, 0.5, 2.0, 1.0])
    keep = torch.ones(4, dtype=torch.bool)
    whole = step_mean(weighted_sum(nll, w), 4, keep)
    parts = step_mean(weighted_sum(nll[:2], w[:2]), 4, keep[:2]) + step_mean(weighted_sum(nll[2:], w[2:]), 4, keep[2:])
    assert whole.item() == parts.item() == 2.25
