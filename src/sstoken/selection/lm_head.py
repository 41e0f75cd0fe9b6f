"""Per-token NLL and the kept-token loss straight from the hidden states: no B×T×V logits, and no extra work.

A causal LM's head is ``logits = softcap(H·Wᵀ + b)`` (softcap: Gemma 2/3's ``final_logit_softcapping``, else
the identity). sstoken needs two things from it, and neither needs the full logits:

1. the current NLL of the *response* tokens, without gradient, to select tokens: their rows of H are projected
   a chunk at a time (at most :func:`rows_per_chunk` rows, at most 128 MiB of logits on a CPU), keeping the row's
   log-sum-exp and its label's logit;
2. the loss, the NLL of the *kept* tokens with gradient, each times its token weight (1 unless the data, the
   selector or DFT weighs it; the weights are constants, DFT's computed from the NLL of (1)). Its value is
   already known from (1); its gradient (softmax − one-hot, through the softcap, times W, times the weight)
   needs the kept rows' logits again, which the backward of :class:`_KeptRowsNLL` recomputes chunk by chunk
   from the log-sum-exp of (1).

So the head costs one projection of the response rows forward and two of the kept rows backward (three with a
trainable W), against one of all B×T rows forward and one or two backward for the full logits: with the prompt
and 40% of the response skipped, less. TRL's fused LM head (``add_fused_lm_head``) also avoids the logits, but
projects every labelled row in the forward and again in the backward, with several passes per tile on a CPU.

The model is patched (:func:`add_sstoken_head`) so that ``model(..., sstoken_head=HeadRequest(...))`` does all
this inside its forward, in a call of its head module: DDP sees the loss come out of the forward, an engine that
holds the head weight sharded (FSDP2) or partitioned (ZeRO-3) gathers it for that call and its backward as for the
model's own head, and the selection (``HeadRequest.select``) runs between (1) and (2). Where that would not give
the model's own numbers, :func:`full_logits_reason` says why and the caller uses the model's full logits instead.
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from packaging.version import Version
from transformers.utils import ModelOutput

from sstoken import distributed
from sstoken.batch import pad_rows, unwrap_base_model, unwrap_model
from sstoken.selection import scoring

logger = logging.getLogger(__name__)

# Float32 logits of one chunk. Each chunk streams all of W (670 MB at vocab 262k, fp32), so too few rows make
# the projection memory-bound: on a CPU, 128 MiB (128 rows at 262k, 682 at 49k) instead of 32 MiB took the head
# from 1.01× to 0.87× the full logits' time at 262k (BENCHMARKS.md), and its few chunk-sized temporaries stay well
# below the 1 GiB of full logits at T=1024 (and below the tiles of TRL's fused head). Accelerators get bigger chunks, as their matmuls need more rows to be efficient
# (reasoned, not yet measured).
LOGITS_CHUNK_BYTES = {"cpu": 128 * 2**20}
DEFAULT_LOGITS_CHUNK_BYTES = 512 * 2**20
# Tokens of the one-off forward that checks this head reproduces the model's own logits.
PROBE_TOKENS = 4
# torch.mm(..., out_dtype=torch.float32) on half-precision operands: CUDA only, torch 2.8 and later.
_MM_HAS_OUT_DTYPE = Version(torch.__version__.split("+")[0]) >= Version("2.8")


# ----------------------------------------------------------------------------------------------- pure maths
def rows_per_chunk(vocab_size: int, chunk_bytes: int) -> int:
    """Rows of float32 logits that fit in ``chunk_bytes`` (at least one)."""
    return max(1, chunk_bytes // (4 * vocab_size))


def chunk_rows_for(weight: torch.Tensor) -> int:
    bytes_ = LOGITS_CHUNK_BYTES.get(weight.device.type, DEFAULT_LOGITS_CHUNK_BYTES)
    return rows_per_chunk(weight.shape[0], bytes_)


def project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            softcap: float | None) -> torch.Tensor:
    """Float32 logits of ``hidden`` rows, computed in the model's dtype exactly as its forward does."""
    logits = F.linear(hidden.to(weight.dtype), weight, bias)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.float()


def compute_dtype_of(weight: torch.Tensor) -> torch.dtype:
    """The dtype the model's LM head multiplies in here: autocast's inside an autocast region, else the weight's."""
    device = weight.device.type
    if weight.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def head_in(weight: torch.Tensor, bias: torch.Tensor | None,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's weight and bias in ``dtype``, cast once for all chunks: autocast caches its casts only of weights
    that require grad, so a frozen head would be cast again for every chunk (a full V×d copy each time)."""
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def logit_stats(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy of the predicted distribution, whether ``targets`` is its argmax) per row of float32 ``logits``
    (N×V) whose log-sum-exp is ``lse``: TRL's ``entropy`` and ``mean_token_accuracy`` metrics, per token."""
    probs = (logits - lse[:, None]).exp()
    entropy = lse - (probs * logits).sum(-1)  # -Σ p·log p, with log p = logit - lse
    return entropy, logits.argmax(-1) == targets


@dataclass
class RowStats:
    """Per-row metrics of :func:`label_nll_and_lse` with ``stats=True`` (float32 entropy, bool argmax hit)."""

    entropy: torch.Tensor
    is_top1: torch.Tensor


@torch.no_grad()
def label_nll_and_lse(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None, softcap: float | None,
                      chunk_rows: int, stats: bool = False):
    """(NLL of ``targets``, log-sum-exp) per row of ``hidden`` (N×d), both float32, ``chunk_rows`` rows at a time.

    With ``stats``, a third value: :class:`RowStats` computed from the same chunks of logits (two more passes over
    each chunk, which is why the trainer asks for them only on logging steps)."""
    n = hidden.shape[0]
    nll = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    row_stats = RowStats(entropy=torch.empty(n, dtype=torch.float32, device=hidden.device),
                         is_top1=torch.empty(n, dtype=torch.bool, device=hidden.device)) if stats else None
    weight, bias = head_in(weight, bias, compute_dtype_of(weight))
    for start in range(0, n, chunk_rows):
        stop = start + chunk_rows
        logits = project(hidden[start:stop], weight, bias, softcap)
        lse[start:stop] = torch.logsumexp(logits, dim=-1)
        nll[start:stop] = lse[start:stop] - logits.gather(1, targets[start:stop, None]).squeeze(1)
        if row_stats is not None:
            row_stats.entropy[start:stop], row_stats.is_top1[start:stop] = logit_stats(
                logits, lse[start:stop], targets[start:stop])
    return (nll, lse, row_stats) if stats else (nll, lse)


class _KeptRowsNLL(torch.autograd.Function):
    """NLL of ``targets`` per row of ``hidden``, with gradient, from the values ``label_nll_and_lse`` returned.

    The forward computes nothing (the NLL is known); the backward recomputes one chunk of logits at a time, in the
    precision the forward's log-sum-exp came from (bf16 under mixed precision), and multiplies the logits' gradient
    into the hidden-state and weight gradients in float32 (:func:`fp32_product`), as TRL's fused head does.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, nll, lse, softcap, chunk_rows):
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.softcap, ctx.chunk_rows = softcap, chunk_rows
        # Autograd runs the backward outside the forward's autocast: the precision is recorded here.
        ctx.compute_dtype = compute_dtype_of(weight)
        return nll.clone()

    @staticmethod
    def backward(ctx, grad_nll):
        # Every dtype below is chosen, not autocast's (a backward called inside an autocast region included).
        with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
            return _KeptRowsNLL._backward(ctx, grad_nll)

    @staticmethod
    def _backward(ctx, grad_nll):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        softcap, chunk_rows = ctx.softcap, ctx.chunk_rows
        head_weight, head_bias = head_in(weight, bias, ctx.compute_dtype)
        operand = product_operand(weight, head_weight) if need_hidden else None
        accumulate = accumulation_dtype(weight)
        grad_nll = grad_nll.to(torch.float32)
        grad_hidden = torch.empty(hidden.shape, dtype=accumulate, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=accumulate, device=bias.device) if need_bias else None
        for start in range(0, hidden.shape[0], chunk_rows):
            stop = start + chunk_rows
            h = hidden[start:stop]
            # In place on the one chunk-sized buffer: at a 262k vocabulary the passes over it cost as much as
            # the matmuls.
            grad_logits = project(h, head_weight, head_bias, softcap)
            # d(c·tanh(x/c))/dx = 1 − tanh²(x/c), and the capped logit is c·tanh(x/c)
            softcap_slope = None if softcap is None else 1.0 - (grad_logits / softcap) ** 2
            # d NLL / d logit = softmax − one-hot(target). The softmax is normalised by its own sum, so that it
            # sums to one even where this recomputation rounds a logit differently than the forward pass whose
            # log-sum-exp it reuses (a half-precision GEMM over other rows may pick another kernel).
            grad_logits.sub_(lse[start:stop, None]).exp_()
            rows_grad = grad_nll[start:stop]
            grad_logits.mul_((rows_grad / grad_logits.sum(-1))[:, None])
            grad_logits[torch.arange(h.shape[0], device=h.device), targets[start:stop]] -= rows_grad
            if softcap_slope is not None:
                grad_logits.mul_(softcap_slope)
            if need_hidden:
                grad_hidden[start:stop] = fp32_product(grad_logits, operand, accumulate)
            if need_weight:
                grad_weight += fp32_product(grad_logits.t(), product_operand(h, h), accumulate)
            if need_bias:
                grad_bias += grad_logits.sum(0)
        return (None if grad_hidden is None else grad_hidden.to(hidden.dtype),
                None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype),
                None, None, None, None, None)


def accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 tensors: the gradient products are never summed in half precision."""
    return torch.promote_types(torch.float32, tensor.dtype)


def _half_precision_product(tensor: torch.Tensor) -> bool:
    """Whether products with ``tensor`` go to the GEMM in half precision with a float32 output (CUDA only)."""
    return _MM_HAS_OUT_DTYPE and tensor.is_cuda and tensor.dtype in (torch.float16, torch.bfloat16)


def product_operand(tensor: torch.Tensor, compute: torch.Tensor) -> torch.Tensor:
    """The right operand of :func:`fp32_product` for ``tensor`` (``compute``: the same values in the head's compute
    dtype). On CUDA, half precision with a float32 output; elsewhere a float32 copy, made once per backward."""
    if _half_precision_product(compute):
        return compute
    return tensor.to(accumulation_dtype(tensor))


def fp32_product(left: torch.Tensor, right: torch.Tensor, accumulate: torch.dtype) -> torch.Tensor:
    """``left @ right`` summed in (at least) float32 and returned in ``accumulate``.

    The logits' gradient is float32; multiplying it in bf16 would round it, and the sum of the row chunks' weight
    gradients, to 8 mantissa bits (TRL's fused head measured a bias from that: entropy drifting lower within a few
    dozen steps), and on CPUs without bf16 GEMMs it is many times slower than float32."""
    if _half_precision_product(right):
        return torch.mm(left.to(right.dtype), right, out_dtype=torch.float32).to(accumulate)
    return left.to(accumulate) @ right


def kept_rows_nll(hidden: torch.Tensor, targets: torch.Tensor, nll: torch.Tensor, lse: torch.Tensor,
                  weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None,
                  chunk_rows: int) -> torch.Tensor:
    """``nll`` (from :func:`label_nll_and_lse` on the same rows) with the gradient of the cross-entropy."""
    return _KeptRowsNLL.apply(hidden, weight, bias, targets, nll, lse, softcap, chunk_rows)


# ----------------------------------------------------------------------------------------------- the model call
@dataclass
class HeadRequest:
    """What ``model(..., sstoken_head=...)`` computes. B×T tensors aligned to the predicted token.

    ``score_mask``: tokens whose NLL is computed (the response; column 0 is never scored). ``select``: given the
    B×T no-grad NLL, the keep mask (a subset of ``score_mask``) and the B×T token weights (None: all 1); the
    weighted sum of the kept tokens' NLL, with gradient, is the loss. The weights are constants of the backward
    (the gradient of token i is scaled by wᵢ). None computes the NLL only (history passes, ``sstoken cache``).
    """

    labels: torch.Tensor
    score_mask: torch.Tensor
    select: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]] | None = None
    stats: bool = False  # also the entropy / argmax-accuracy sums over score_mask (TRL's logged metrics)


@dataclass
class HeadOutput(ModelOutput):
    token_nll: torch.Tensor | None = None  # B×T float32, no gradient; 0 outside score_mask
    keep: torch.Tensor | None = None
    kept_nll_sum: torch.Tensor | None = None  # Σ wᵢ·NLLᵢ over the kept tokens, with gradient
    entropy_sum: torch.Tensor | None = None  # over score_mask, when HeadRequest.stats
    top1_count: torch.Tensor | None = None  # tokens of score_mask that are the argmax, when HeadRequest.stats
    aux_loss: torch.Tensor | None = None  # MoE load-balancing loss, as the model's own forward returns it


def head_outputs(hidden: torch.Tensor, head: torch.nn.Module, softcap: float | None,
                 request: HeadRequest) -> HeadOutput:
    """Steps (1) and (2) of the module docstring on the backbone's B×T×d ``hidden`` states."""
    weight, bias = head.weight, head.bias
    if distributed.is_dtensor(weight):
        # FSDP2 unshards a weight for the forward of the unit that owns it: the root, or the head module (which runs
        # this). A tied weight owned by an input embedding sharded as a unit of its own is a shard here.
        raise RuntimeError("the LM head weight is still an FSDP2 shard (DTensor) in the head's forward: it belongs "
                           "to another FSDP unit (a tied input embedding sharded on its own?); shard the embedding "
                           "with the root module or with the head")
    device = weight.device
    hidden = hidden.to(device)  # a model split across devices (device_map) may end elsewhere than its head
    score_mask = request.score_mask.to(device).clone()
    score_mask[:, 0] = False
    batch_rows, positions = score_mask.nonzero(as_tuple=True)
    targets = request.labels.to(device)[batch_rows, positions]
    chunk_rows = chunk_rows_for(weight)
    nll, lse, *row_stats = label_nll_and_lse(hidden.detach()[batch_rows, positions - 1], targets, weight, bias,
                                             softcap, chunk_rows, stats=request.stats)
    token_nll = torch.zeros(score_mask.shape, dtype=torch.float32, device=device)
    token_nll[batch_rows, positions] = nll
    stats = {}
    if row_stats:
        stats = dict(entropy_sum=row_stats[0].entropy.sum(), top1_count=row_stats[0].is_top1.sum())
    if request.select is None:
        return HeadOutput(token_nll=token_nll, **stats)
    keep, token_weights = request.select(token_nll)
    keep = keep.to(device)
    if (keep & ~score_mask).any():
        raise ValueError("the keep mask selects tokens whose NLL was not computed (outside score_mask)")
    kept = keep[batch_rows, positions]
    kept_rows, kept_positions = batch_rows[kept], positions[kept]
    kept_nll = kept_rows_nll(hidden[kept_rows, kept_positions - 1], targets[kept], nll[kept], lse[kept],
                             weight, bias, softcap, chunk_rows)
    kept_weights = None if token_weights is None else token_weights.to(device)[kept_rows, kept_positions].detach()
    return HeadOutput(token_nll=token_nll, keep=keep, kept_nll_sum=scoring.weighted_sum(kept_nll, kept_weights),
                      **stats)


def _softcap(base: torch.nn.Module) -> float | None:
    config = getattr(base, "config", None)
    text_config = config.get_text_config() if config is not None else None
    return getattr(text_config, "final_logit_softcapping", None)


def add_sstoken_head(model: torch.nn.Module) -> None:
    """Patch ``model`` (its base model under PEFT) so that ``sstoken_head=HeadRequest(...)`` runs the backbone
    and :func:`head_outputs` instead of the LM head; without it the forward is the original one. Once.

    Ours is the outermost patch: SFTTrainer wraps its own fused head around the forward, and an earlier patch
    (e.g. from ``sstoken cache`` on the same model) stays underneath, as could accelerate's device-map hooks.
    """
    base = unwrap_base_model(model)
    ours = getattr(base, "_sstoken_forward", None)
    # Already outermost, or wrapped since by accelerate's mixed-precision autocast (which then covers our head too).
    if ours is not None and ours in (vars(base).get("forward"), vars(base).get("_original_forward")):
        return
    original_forward = base.forward
    softcap = _softcap(base)

    @functools.wraps(type(base).forward)
    def forward(self, *args, sstoken_head: HeadRequest | None = None, **kwargs):
        if sstoken_head is None:
            return original_forward(*args, **kwargs)
        aux_loss_of = moe_aux_loss_function(self)
        if aux_loss_of is not None:
            kwargs["output_router_logits"] = True  # what the model's own forward passes its backbone
        # Looked up on each call: PEFT and FSDP replace modules after patching.
        backbone = self.base_model(*args, **kwargs)
        head = self.get_output_embeddings()
        _route_requests_through(head, softcap)
        # A call of the head module itself, so that an engine holding its weight gathers it for this forward and
        # its backward as for the model's own head: ZeRO-3's module hooks, FSDP2's unsharding of the unit that
        # owns it.
        outputs = head(backbone.last_hidden_state, sstoken_head=sstoken_head)
        if aux_loss_of is not None:
            outputs.aux_loss = aux_loss_of(backbone.router_logits, kwargs.get("attention_mask"))
        return outputs

    base.forward = types.MethodType(forward, base)
    base._sstoken_forward = base.forward


def _route_requests_through(head: torch.nn.Module, softcap: float | None) -> None:
    """Let ``head(hidden, sstoken_head=request)`` run :func:`head_outputs`; without a request, the head's own forward.
    Once per module."""
    if vars(head).get("forward") is getattr(head, "_sstoken_forward", None) is not None:
        return
    original_forward = head.forward

    def forward(self, hidden, sstoken_head: HeadRequest | None = None):
        if sstoken_head is None:
            return original_forward(hidden)
        return head_outputs(hidden, self, softcap, sstoken_head)

    head.forward = types.MethodType(forward, head)
    head._sstoken_forward = head.forward


def moe_aux_loss_function(base: torch.nn.Module) -> Callable | None:
    """``fn(router_logits, attention_mask)`` → the load-balancing loss that ``base``'s own forward adds, when its
    config asks for router logits (TRL sets ``output_router_logits`` from ``router_aux_loss_coef``); else None.

    transformers' MoE causal LMs compute it with their module's ``load_balancing_loss_func(router_logits,
    self.num_experts, self.num_experts_per_tok, attention_mask)``; a model that does it otherwise gets None from
    :func:`moe_aux_loss_parts` and the full-logits path (its own forward) instead."""
    config = getattr(base, "config", None)
    if config is None or not getattr(config.get_text_config(), "output_router_logits", False):
        return None
    parts = moe_aux_loss_parts(base)
    if parts is None:
        return None
    loss_func, num_experts, top_k = parts
    return lambda router_logits, attention_mask: loss_func(router_logits, num_experts, top_k, attention_mask)


def moe_aux_loss_parts(base: torch.nn.Module):
    """(load_balancing_loss_func, num_experts, num_experts_per_tok) of a transformers MoE causal LM, or None."""
    import sys

    module = sys.modules.get(type(base).__module__)
    loss_func = getattr(module, "load_balancing_loss_func", None)
    num_experts, top_k = getattr(base, "num_experts", None), getattr(base, "num_experts_per_tok", None)
    if loss_func is None or not isinstance(num_experts, int) or not isinstance(top_k, int):
        return None
    return loss_func, num_experts, top_k


# ----------------------------------------------------------------------------------------------- when not to
def full_logits_reason(model: torch.nn.Module, label_smoothing_factor: float = 0.0) -> str | None:
    """Why per-token NLL of ``model`` needs the full logits; None when :func:`head_outputs` gives it exactly.

    The last check runs the model (:func:`_probe_mismatch`), so under a distributed engine every rank calls this
    at the same point, on the model as the engine holds it (after ``deepspeed.initialize`` / ``fully_shard`` and
    the loading of rank 0's weights): the answer is then the same on every rank."""
    if label_smoothing_factor:
        return f"label smoothing ({label_smoothing_factor}) spreads the loss over the whole vocabulary"
    base = unwrap_base_model(model)
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    weight = getattr(head, "weight", None)
    # Judged by the shape the model computes with: a ZeRO-3 placeholder holds no elements outside the forward.
    if not isinstance(weight, torch.Tensor) or len(distributed.logical_shape(weight)) != 2:
        return f"{type(base).__name__} has no standard LM head (a Linear output embedding)"
    if hasattr(head, "base_layer") or hasattr(head, "modules_to_save"):
        # The head multiplies by ``lm_head.weight``, the frozen base weight: the adapter would be ignored.
        return "the LM head carries a PEFT adapter, which sstoken's head would ignore"
    if getattr(base, "base_model", base) is base:
        return f"{type(base).__name__} exposes no backbone (base_model) separate from its LM head"
    text_config = base.config.get_text_config() if getattr(base, "config", None) is not None else None
    if getattr(text_config, "output_router_logits", False) and moe_aux_loss_parts(base) is None:
        return f"{type(base).__name__}'s MoE load-balancing loss is computed in a way sstoken's head does not know"
    # Once per model: the architecture decides the answer, not the weights.
    if "_sstoken_probe_mismatch" not in vars(base):
        add_sstoken_head(model)
        base._sstoken_probe_mismatch = distributed.first_non_none_across_ranks(_probe_mismatch(model))
    return base._sstoken_probe_mismatch


@torch.no_grad()
def _probe_mismatch(model: torch.nn.Module) -> str | None:
    """Compare the NLL from the model's own logits with sstoken's head on a few tokens: models that scale their
    logits (Cohere, Granite, MiniCPM, Falcon-H1...) or do anything else to them are caught here, whatever the
    config calls it.

    Both forwards go through the outermost module (under FSDP2 the root, which gathers the shards; under ZeRO-3
    the engine's module, whose hooks gather the partitions), exactly as training calls it."""
    outer, base = unwrap_model(model), unwrap_base_model(model)
    name = type(base).__name__
    where = f" on rank {distributed.rank()}" if distributed.world_size() > 1 else ""
    head_weight = base.get_output_embeddings().weight
    vocab = distributed.logical_shape(head_weight)[0]
    if any(param.is_meta for param in outer.parameters()):
        return f"the weights of {name} are not loaded{where} (meta tensors), so sstoken's head cannot be checked"
    was_training = outer.training
    outer.eval()
    try:
        position = torch.arange(PROBE_TOKENS, device=base.get_input_embeddings().weight.device)
        ids, labels = (position % vocab)[None], ((position * 7 + 3) % vocab)[None]
        theirs_logits = outer(input_ids=ids, use_cache=False).logits
        ours = outer(input_ids=ids, use_cache=False, sstoken_head=HeadRequest(
            labels=labels, score_mask=torch.ones_like(labels, dtype=torch.bool))).token_nll[:, 1:]
    except Exception as exc:  # noqa: BLE001 - any failure means the head cannot be trusted on this model
        return f"checking sstoken's head against {name}'s logits failed{where} ({exc})"
    finally:
        outer.train(was_training)
    logits = theirs_logits[:, :-1].float()
    theirs = torch.logsumexp(logits, -1) - logits.gather(-1, labels[:, 1:, None].to(logits.device)).squeeze(-1)
    ours = ours.to(theirs.device)
    # Half-precision matmuls of 1 row or PROBE_TOKENS rows may round differently; a logit scale does not hide.
    # accelerate's mixed precision autocasts inside the forward and returns float32 logits (``_original_forward``
    # marks its wrapper).
    autocast = torch.is_autocast_enabled(theirs_logits.device.type) or \
        any("_original_forward" in vars(module) for module in (outer, base))
    exact = theirs_logits.dtype == head_weight.dtype == torch.float32 and not autocast
    tolerance = 1e-4 if exact else 2e-2
    scale = max(1.0, float(logits.abs().max()))
    if not torch.allclose(ours, theirs, rtol=tolerance, atol=tolerance * scale):
        return (f"{name}'s logits are not softcap(hidden·Wᵀ + b) of its backbone's output "
                f"(max NLL difference {float((ours - theirs).abs().max()):.3g}{where})")
    return None


def log_full_logits_fallback(reason: str, where: str) -> None:
    logger.warning("sstoken %s: per-token NLL from the full B×T×V logits, because %s", where, reason)


def use_sstoken_head(model: torch.nn.Module, where: str, label_smoothing_factor: float = 0.0) -> str | None:
    """Install sstoken's head on ``model`` where it reproduces the model's own numbers. Returns None when it did,
    else the reason the caller must use the full logits (logged, naming ``where``: training, cache, ...)."""
    reason = full_logits_reason(model, label_smoothing_factor)
    if reason is None:
        add_sstoken_head(model)
    else:
        log_full_logits_fallback(reason, where)
    return reason


def output_nll(outputs, labels: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """B×T float32 per-token NLL without gradient, aligned to the predicted token, from either forward."""
    if isinstance(outputs, HeadOutput):
        return outputs.token_nll
    return scoring.token_nll(outputs.logits.detach(), labels, chunk_size)


def rows_token_nll(model: torch.nn.Module, rows, pad_id: int, use_head: bool,
                   chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """One no-grad forward over a padded batch of encoded rows (dicts with input_ids and labels): the B×T
    per-token NLL on the CPU and the padded labels. ``use_head``: the model has sstoken's head installed (see
    :func:`use_sstoken_head`), so only the response positions are projected."""
    device = next(model.parameters()).device
    ids, labels, mask = pad_rows(rows, pad_id)
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False}
    if use_head:
        response = scoring.response_mask_from_labels(labels) & mask.bool()
        inputs["sstoken_head"] = HeadRequest(labels=labels.to(device), score_mask=response.to(device))
    with torch.no_grad():
        nll = output_nll(model(**inputs), labels.to(device), chunk_size)
    return nll.cpu(), labels
