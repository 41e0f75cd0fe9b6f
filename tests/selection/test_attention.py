"""Context-attention share: the wrapped attention path must match eager ``output_attentions`` exactly."""

from __future__ import annotations

import math

import pytest
import torch

from sstoken.errors import ConfigError
from sstoken.selection.attention import (
    ContextShareProbe,
    context_share,
    context_share_from_qk,
    segment_ids_from_position_ids,
)
from sstoken.testing import tiny_model

ATOL = 1e-5
VOCAB = 300  # below the tiny tokenizer's vocabulary size


def _roles_to_mask(spans):
    """[(is_context, length), ...] -> bool list."""
    return [flag for flag, n in spans for _ in range(n)]


def make_batch(pad_side="right", seed=0):
    """Two multi-turn rows of 12 and 8 valid tokens: system+user, assistant, user, assistant.

    Context = the non-assistant spans, i.e. several non-contiguous spans per row.
    """
    g = torch.Generator().manual_seed(seed)
    seq_len = 12
    rows = [
        _roles_to_mask([(True, 3), (False, 3), (True, 2), (False, 4)]),
        _roles_to_mask([(True, 2), (False, 2), (True, 2), (False, 2)]),
    ]
    ids = torch.randint(0, VOCAB, (2, seq_len), generator=g)
    attn = torch.zeros(2, seq_len, dtype=torch.long)
    ctx = torch.zeros(2, seq_len, dtype=torch.bool)
    for b, row in enumerate(rows):
        n = len(row)
        sl = slice(0, n) if pad_side == "right" else slice(seq_len - n, seq_len)
        attn[b, sl] = 1
        ctx[b, sl] = torch.tensor(row)
    return ids, attn, ctx


def eager_reference(arch, ids, attn, ctx, layer, **overrides):
    """Same weights (same seed), eager attention, attention maps summed over context keys, mean over heads."""
    model = tiny_model(arch, attn_implementation="eager", **overrides)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn, output_attentions=True, use_cache=False)
    probs = out.attentions[layer].float()  # (B, H, T, T)
    return (probs * ctx[:, None, None, :].float()).sum(-1).mean(1)


def assert_close_on_valid(share, ref, attn):
    valid = attn.bool()
    assert share.dtype == torch.float32
    assert not torch.isnan(share).any()
    torch.testing.assert_close(share[valid], ref[valid], atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ pure maths


def test_pure_function_hand_computed():
    # 1 head, 3 tokens, d=1: score_ij = q_i * k_j * scaling
    q = torch.tensor([1.0, 2.0, -1.0]).view(1, 1, 3, 1)
    k = torch.tensor([0.5, -1.0, 2.0]).view(1, 1, 3, 1)
    scaling = 0.7
    ctx = torch.tensor([[True, False, True]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    s = [[q.flatten()[i].item() * k.flatten()[j].item() * scaling for j in range(3)] for i in range(3)]
    e = [[math.exp(x) for x in row] for row in s]
    expected = [
        1.0,  # token 0 sees only itself, a context key
        e[1][0] / (e[1][0] + e[1][1]),
        (e[2][0] + e[2][2]) / (e[2][0] + e[2][1] + e[2][2]),
    ]
    share = context_share_from_qk(q, k, scaling, ctx, valid)
    torch.testing.assert_close(share, torch.tensor([expected]), atol=1e-6, rtol=0)
    # chunking does not change anything
    torch.testing.assert_close(context_share_from_qk(q, k, scaling, ctx, valid, chunk_size=1), share)


def test_pure_function_low_precision_inputs_and_gqa():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 5, 8, generator=g).bfloat16()
    k = torch.randn(2, 2, 5, 8, generator=g).bfloat16()
    ctx = torch.tensor([[1, 1, 0, 0, 1], [0, 1, 0, 1, 0]], dtype=torch.bool)
    valid = torch.ones(2, 5, dtype=torch.bool)
    share = context_share_from_qk(q, k, 8**-0.5, ctx, valid, chunk_size=2)
    assert share.dtype == torch.float32
    # naive reference: expand kv heads, full softmax
    kk = k.float().repeat_interleave(2, dim=1)
    scores = q.float() @ kk.transpose(-1, -2) * 8**-0.5
    scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    ref = (scores.softmax(-1) * ctx[:, None, None, :]).sum(-1).mean(1)
    torch.testing.assert_close(share, ref, atol=1e-6, rtol=0)


def test_per_head_shares_are_each_heads_softmax_mass_and_average_to_the_share():
    # 2 query heads sharing 1 kv head (GQA), 2 tokens, d=1; token 0 is context. Token 1 of head h puts
    # exp(s0) / (exp(s0) + exp(s1)) on the context, with s_j = q_h * k_j * scaling.
    q = torch.tensor([[0.0, 1.0], [0.0, -2.0]]).view(1, 2, 2, 1)
    k = torch.tensor([1.5, 0.5]).view(1, 1, 2, 1)
    ctx = torch.tensor([[True, False]])
    valid = torch.ones(1, 2, dtype=torch.bool)

    def mass(qh):
        return math.exp(qh * 1.5) / (math.exp(qh * 1.5) + math.exp(qh * 0.5))

    heads = context_share_from_qk(q, k, 1.0, ctx, valid, per_head=True)
    assert heads.shape == (1, 2, 2)
    torch.testing.assert_close(heads, torch.tensor([[[1.0, mass(1.0)], [1.0, mass(-2.0)]]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(heads.mean(1), context_share_from_qk(q, k, 1.0, ctx, valid), atol=1e-7, rtol=0)


def test_per_head_capture_matches_eager_heads_and_keeps_the_mean():
    ids, attn, ctx = make_batch("right")
    model = tiny_model("llama", attn_implementation="eager")
    with torch.no_grad():
        probs = model(input_ids=ids, attention_mask=attn, output_attentions=True, use_cache=False).attentions[-1]
    eager_heads = (probs.float() * ctx[:, None, None, :].float()).sum(-1)  # (B, H, T)
    model = tiny_model("llama")
    probe = ContextShareProbe(model, layer=-1)
    with torch.no_grad(), probe.capture(ctx, attn, per_head=True) as cap:
        model(input_ids=ids, attention_mask=attn)
    valid = attn.bool()
    assert cap.head_shares.shape == (2, 4, 12)
    torch.testing.assert_close(cap.head_shares.permute(0, 2, 1)[valid], eager_heads.permute(0, 2, 1)[valid],
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(cap.share, cap.head_shares.mean(1))
    with torch.no_grad(), probe.capture(ctx, attn) as plain:
        model(input_ids=ids, attention_mask=attn)
    assert plain.head_shares is None  # kept only when asked for
    torch.testing.assert_close(plain.share, cap.share)


def test_no_context_and_all_padding_rows_give_zero():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(3, 2, 4, 4, generator=g)
    k = torch.randn(3, 1, 4, 4, generator=g)
    ctx = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    valid = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    share = context_share_from_qk(q, k, 0.5, ctx, valid)
    assert not torch.isnan(share).any()
    assert torch.equal(share[0], torch.zeros(4))  # no context at all
    assert torch.equal(share[1, :2], torch.zeros(2))  # context only appears later (not visible yet)
    assert (share[1, 2:] > 0).all()
    assert torch.equal(share[2], torch.zeros(4))  # all padding


def test_segment_ids_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert segment_ids_from_position_ids(pos).tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]]


# ------------------------------------------------------------------------------------------------ vs eager


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("pad_side", ["right", "left"])
@pytest.mark.parametrize("layer", [0, -1])
def test_matches_eager_attentions(arch, pad_side, layer):
    ids, attn, ctx = make_batch(pad_side)
    ref = eager_reference(arch, ids, attn, ctx, layer)
    model = tiny_model(arch)  # sdpa
    share = context_share(model, ids, attn, ctx, layer=layer)
    assert model.config._attn_implementation == "sdpa"
    assert_close_on_valid(share, ref, attn)


def test_small_chunks_give_same_result():
    ids, attn, ctx = make_batch("left")
    model = tiny_model("llama")
    full = context_share(model, ids, attn, ctx)
    chunked = context_share(model, ids, attn, ctx, chunk_size=3)
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=0)


def test_sliding_window_matches_eager():
    ids, attn, ctx = make_batch("right")
    ref = eager_reference("mistral", ids, attn, ctx, -1, sliding_window=3)
    share = context_share(tiny_model("mistral", sliding_window=3), ids, attn, ctx, chunk_size=5)
    assert_close_on_valid(share, ref, attn)
    # the window matters: without it the result differs
    assert not torch.allclose(share, context_share(tiny_model("mistral"), ids, attn, ctx), atol=1e-4)


def test_eager_base_implementation_is_wrapped_too():
    ids, attn, ctx = make_batch("right")
    ref = eager_reference("llama", ids, attn, ctx, -1)
    model = tiny_model("llama", attn_implementation="eager")
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=attn).logits
    share = context_share(model, ids, attn, ctx)
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=attn).logits
    assert torch.equal(before, after)
    assert_close_on_valid(share, ref, attn)


def test_packed_rows_equal_separate_samples():
    ids_a, ids_b = torch.randint(0, VOCAB, (1, 5)), torch.randint(0, VOCAB, (1, 7))
    ctx_a = torch.tensor([[1, 1, 0, 0, 0]], dtype=torch.bool)
    ctx_b = torch.tensor([[1, 1, 1, 0, 0, 1, 0]], dtype=torch.bool)
    model = tiny_model("llama")
    sep_a = context_share(model, ids_a, None, ctx_a)
    sep_b = context_share(model, ids_b, None, ctx_b)
    packed_ids = torch.cat([ids_a, ids_b], 1)
    packed_ctx = torch.cat([ctx_a, ctx_b], 1)
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    packed = context_share(model, packed_ids, None, packed_ctx, position_ids=pos)
    torch.testing.assert_close(packed, torch.cat([sep_a, sep_b], 1), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ installation


def test_probe_keeps_sdpa_logits_and_never_uses_eager(monkeypatch):
    import transformers.models.llama.modeling_llama as llama_mod

    def no_eager(*args, **kwargs):
        raise AssertionError("eager attention must not be used")

    ids, attn, ctx = make_batch("left")
    model = tiny_model("llama")
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=attn).logits
    monkeypatch.setattr(llama_mod, "eager_attention_forward", no_eager)
    probe = ContextShareProbe(model)
    assert probe.layer_index == 1
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        with probe.capture(ctx, attn) as cap:
            during = model(input_ids=ids, attention_mask=attn).logits
        after = model(input_ids=ids, attention_mask=attn).logits  # no capture active: plain pass-through
    assert cap.share is not None and cap.share.shape == (2, 12)
    torch.testing.assert_close(during, before, atol=1e-6, rtol=0)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


def test_installation_is_idempotent_and_capture_scoped():
    ids, attn, ctx = make_batch("right")
    model = tiny_model("qwen2")
    p1 = ContextShareProbe(model, layer=0)
    p2 = ContextShareProbe(model, layer=-1)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad(), p1.capture(ctx, attn) as c1, p2.capture(ctx, attn) as c2:
        model(input_ids=ids, attention_mask=attn)
    assert c1.share is not None and c2.share is not None
    assert not torch.allclose(c1.share, c2.share)
    assert not hasattr(p1._module, "_sstoken_capture")
    # a capture whose forward never ran leaves share at None
    with p1.capture(ctx, attn) as c3:
        pass
    assert c3.share is None


def test_capture_with_gradient_checkpointing_and_backward():
    ids, attn, ctx = make_batch("right")
    ref = context_share(tiny_model("llama"), ids, attn, ctx)
    model = tiny_model("llama")
    model.activation_checkpointing_enable()
    model.train()
    probe = ContextShareProbe(model)
    with probe.capture(ctx, attn) as cap:
        loss = model(input_ids=ids, attention_mask=attn, labels=ids).loss
        loss.backward()  # recompute inside the capture does not disturb the share
    assert not cap.share.requires_grad
    assert_close_on_valid(cap.share, ref, attn)
    model.zero_grad()
    model(input_ids=ids, attention_mask=attn, labels=ids).loss.backward()  # outside any capture


@pytest.mark.parametrize("layer", [2, -3, 7])
def test_out_of_range_layer_raises(layer):
    with pytest.raises(ConfigError, match="out of range"):
        ContextShareProbe(tiny_model("llama"), layer=layer)


def test_works_with_peft_lora():
    peft = pytest.importorskip("peft")
    ids, attn, ctx = make_batch("left")
    ref = eager_reference("llama", ids, attn, ctx, -1)
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    share = context_share(model, ids, attn, ctx)  # LoRA B starts at zero: same outputs as the base model
    assert model.get_base_model().config._attn_implementation == "sdpa"
    assert_close_on_valid(share, ref, attn)


# ------------------------------------------------------------------------------------------------ other attention kinds

GPT_OSS = dict(num_local_experts=2, num_experts_per_tok=1, sliding_window=3, head_dim=8,
               layer_types=["sliding_attention", "full_attention"])


@pytest.mark.parametrize("layer", [0, -1], ids=["sliding", "full"])
def test_attention_sinks_take_their_share_of_the_softmax(layer):
    """gpt-oss adds a per-head sink logit to every softmax (s_aux): the context share is taken of the whole mass,
    sink included, as in eager attention. Leaving the sink out was off by up to 0.5."""
    ids, attn, ctx = make_batch("right")
    model = tiny_model("gpt_oss", attn_implementation="eager", **GPT_OSS)
    with torch.no_grad():
        for decoder_layer in model.model.layers:
            decoder_layer.self_attn.sinks.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(1))
        out = model(input_ids=ids, attention_mask=attn, output_attentions=True, use_cache=False)
    probs = out.attentions[layer].float()
    assert (probs.sum(-1)[attn.bool()[:, None].expand(-1, probs.shape[1], -1)] < 0.99).any()  # the sinks matter
    ref = (probs * ctx[:, None, None, :].float()).sum(-1).mean(1)
    share = context_share(model, ids, attn, ctx, layer=layer)
    assert_close_on_valid(share, ref, attn)


def test_chunked_attention_layers_are_refused_with_the_usable_ones():
    """Llama 4's chunked layers see only their own chunk, a mask the share does not reproduce (error 0.7-0.8)."""
    model = tiny_model("llama4_text", attention_chunk_size=4, no_rope_layers=[1, 0], intermediate_size_mlp=64,
                       num_local_experts=1, head_dim=8)
    assert model.config.layer_types == ["chunked_attention", "full_attention"]
    usable = r"full or sliding attention layer \(here: 1\)"
    with pytest.raises(ConfigError, match=r"layer 0 .* 'chunked_attention'.*" + usable):
        ContextShareProbe(model, layer=0)
    assert ContextShareProbe(model, layer=1).layer_index == 1


# ------------------------------------------------------------------------------------------------ implementations
# transformers dispatches on the implementation's name: its flash path loads the kernel that
# ``config._attn_implementation`` names (flash_attention_2/3/4, or a Hub kernel repo), so the probe must leave the
# name alone. The stand-ins (tests/conftest.py) are flash-attn's API computed with SDPA; transformers' own flash
# path (unpadding, varlen calls, mask handling) runs around them.

def _packed_batch():
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    ctx = torch.tensor([[1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 1, 0]], dtype=torch.bool)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    return ids, None, ctx, position_ids


@pytest.mark.parametrize("layout", ["right", "left", "packed"])
@pytest.mark.parametrize("implementation", ["flash_attention_2_standin", "hub_kernel_standin"])
def test_flash_implementations_keep_their_name_logits_and_give_the_sdpa_share(implementation, layout, request):
    name = request.getfixturevalue(implementation)
    ids, attn, ctx, position_ids = _packed_batch() if layout == "packed" else (*make_batch(layout), None)
    inputs = dict(input_ids=ids, attention_mask=attn, position_ids=position_ids)
    expected = context_share(tiny_model("llama"), ids, attn, ctx, position_ids=position_ids)  # same weights, SDPA

    model = tiny_model("llama", attn_implementation=name)
    assert model.config._attn_implementation == name
    with torch.no_grad():
        before = model(**inputs).logits
    probe = ContextShareProbe(model)
    with torch.no_grad(), probe.capture(ctx, attn, position_ids) as cap:
        during = model(**inputs).logits
    assert model.config._attn_implementation == name, "the name transformers dispatches on is unchanged"
    valid = torch.ones_like(ctx) if attn is None else attn.bool()
    torch.testing.assert_close(during[valid], before[valid], atol=0, rtol=0)
    assert_close_on_valid(cap.share, expected, valid.long())


def test_the_share_follows_an_implementation_switched_after_the_probe(flash_attention_2_standin):
    ids, attn, ctx = make_batch("right")
    expected = context_share(tiny_model("llama"), ids, attn, ctx)
    model = tiny_model("llama")
    probe = ContextShareProbe(model)
    for name in ("eager", flash_attention_2_standin, "sdpa"):
        model.set_attn_implementation(name)
        with torch.no_grad(), probe.capture(ctx, attn) as cap:
            model(input_ids=ids, attention_mask=attn)
        assert model.config._attn_implementation == name
        assert_close_on_valid(cap.share, expected, attn)


def test_other_models_of_the_same_architecture_are_untouched():
    ids, attn, ctx = make_batch("right")
    hooked, other = tiny_model("llama"), tiny_model("llama", seed=1)
    with torch.no_grad():
        before = other(input_ids=ids, attention_mask=attn).logits
    probe = ContextShareProbe(hooked)
    with torch.no_grad(), probe.capture(ctx, attn) as cap:
        during = other(input_ids=ids, attention_mask=attn).logits  # the capture is the hooked model's
    assert cap.share is None
    assert torch.equal(during, before)
