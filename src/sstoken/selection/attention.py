"""ssToken context-attention share, computed inside the normal forward pass.

For one decoder layer we want, for every query token i, the fraction of its attention probability (mean over
query heads) that lands on *context* keys (prompt / user turns): ``share = sum_{j in ctx} p_ij``. Asking the model
for ``output_attentions`` would force eager attention and materialise B x H x T x T maps for every layer, so
instead we wrap the attention function the layer gets from transformers' ``AttentionInterface``: the wrapper sees
the post-RoPE query/key of the target layer, computes the share chunk by chunk from log-sum-exps, and then calls
that function unchanged, so the training forward pass is untouched.

The model keeps its attention implementation's name. transformers dispatches on that name well beyond picking the
function: its flash path loads the kernel named by ``config._attn_implementation`` (``flash_attention_2``/``3``/``4``,
or a Hub kernel repo such as ``kernels-community/flash-attn3``), masks are built for that name, and models branch on
it. So nothing is renamed or re-registered: each modeling file looks its attention function up in a module-level
``ALL_ATTENTION_FUNCTIONS`` (``get_interface(config._attn_implementation, eager_attention_forward)``), and the probe
gives the file of the hooked layer an ``AttentionInterface`` that answers every lookup as before, with the answer
wrapped (transformers' own mechanism for a file that overrides attention functions locally). Every implementation
that lookup returns is served: sdpa, eager, flash_attention_2/3/4, flex_attention and Hub kernels.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import ContextManager

import torch

from sstoken.batch import unwrap_base_model
from sstoken.errors import ConfigError

_CAPTURE_ATTR = "_sstoken_capture"  # set on the target attention module only while a capture is active
_INTERFACE = "ALL_ATTENTION_FUNCTIONS"  # the name every modeling file looks its attention functions up in


# --------------------------------------------------------------------------------------------------------------
# Pure maths
# --------------------------------------------------------------------------------------------------------------


def segment_ids_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """B x T segment index: a new packed sample starts wherever position_ids do not increase by exactly 1.

    Same rule as ``transformers.masking_utils.find_packed_sequence_indices`` (but always returns a tensor).
    """
    position_ids = torch.as_tensor(position_ids)
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    first = position_ids[:, :1] - 1  # makes the first step count as "+1", i.e. no new segment
    diff = torch.diff(position_ids, prepend=first, dim=-1)
    return (diff != 1).long().cumsum(-1)


def context_share_from_qk(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    context_mask: torch.Tensor,
    key_valid: torch.Tensor,
    segment_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
    chunk_size: int = 256,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    per_head: bool = False,
) -> torch.Tensor:
    """Share of each query's attention on its visible context keys, mean over query heads. Returns B x T float32,
    or B x Hq x T (one share per query head, the mean's terms) with ``per_head``.

    query: (B, Hq, T, d), key: (B, Hkv, T, d) with Hq a multiple of Hkv (GQA). context_mask / key_valid /
    segment_ids: B x T. Key j is visible to query i when j <= i, key_valid[j], same segment, and (if a sliding
    window W is given) i - j < W, as in transformers' masks. Per head, share = exp(LSE over visible context keys -
    LSE over all visible keys). Queries that are padding, or that see no context key, get 0 (never NaN).
    ``sinks`` (Hq,): per-head attention-sink logits (gpt-oss ``s_aux``), a key that every query sees and that
    takes part of the softmax mass: the denominator's LSE then includes it. Extra memory is O(B * Hq * chunk_size * T).
    """
    bsz, n_q_heads, seq_len, head_dim = query.shape
    n_kv_heads = key.shape[1]
    if n_q_heads % n_kv_heads:
        raise ValueError(f"{n_q_heads} query heads are not a multiple of {n_kv_heads} key/value heads")
    group = n_q_heads // n_kv_heads
    device = query.device

    context_mask = context_mask.to(device=device, dtype=torch.bool)
    key_valid = key_valid.to(device=device, dtype=torch.bool)
    if segment_ids is None:
        segment_ids = torch.zeros(bsz, seq_len, dtype=torch.long, device=device)
    segment_ids = segment_ids.to(device)
    positions = torch.arange(seq_len, device=device)
    neg_inf = torch.tensor(float("-inf"), device=device)
    zero = torch.zeros((), device=device)

    sink_logits = None
    if sinks is not None:
        sink_logits = sinks.detach().float().to(device).reshape(1, n_kv_heads, group, 1)  # like q's head layout

    with torch.no_grad():
        # GQA without copying k: query head h uses kv head h // group, so view q as (B, Hkv, group, T, d).
        q = query.detach().float().reshape(bsz, n_kv_heads, group, seq_len, head_dim)
        k = key.detach().float().unsqueeze(2)  # (B, Hkv, 1, T, d)
        share = torch.zeros(bsz, n_kv_heads, group, seq_len, dtype=torch.float32, device=device)
        for start in range(0, seq_len, chunk_size):
            end = min(start + chunk_size, seq_len)
            rows = positions[start:end]
            scores = torch.matmul(q[:, :, :, start:end], k.transpose(-1, -2)) * scaling  # (B, Hkv, g, c, T)
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap

            # (B, c, T) visibility, shared by all heads
            visible = (positions[None, :] <= rows[:, None]).unsqueeze(0)
            if sliding_window is not None:
                visible = visible & (positions[None, :] > rows[:, None] - sliding_window).unsqueeze(0)
            visible = visible & key_valid[:, None, :] & key_valid[:, start:end, None]  # padding queries -> 0
            visible = visible & (segment_ids[:, start:end, None] == segment_ids[:, None, :])
            visible_ctx = visible & context_mask[:, None, :]

            lse_all = torch.where(visible[:, None, None], scores, neg_inf).logsumexp(-1)
            if sink_logits is not None:
                lse_all = torch.logaddexp(lse_all, sink_logits)
            lse_ctx = torch.where(visible_ctx[:, None, None], scores, neg_inf).logsumexp(-1)
            has_ctx = visible_ctx.any(-1)[:, None, None]  # implies a finite lse_all
            share[..., start:end] = torch.where(has_ctx, (lse_ctx - lse_all).exp(), zero)
    if per_head:
        return share.reshape(bsz, n_q_heads, seq_len)  # query head h = kv head h // group, member h % group
    return share.mean(dim=(1, 2))


# --------------------------------------------------------------------------------------------------------------
# Attention-interface wrapper
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ShareCapture:
    """Batch metadata for one forward pass; ``share`` is filled when the target layer runs."""

    context_mask: torch.Tensor
    key_valid: torch.Tensor
    segment_ids: torch.Tensor | None
    chunk_size: int
    share: torch.Tensor | None = None
    # name -> context manager around the share's computation (SSTokenTrainer.part_timer); None = untimed
    timer: Callable[[str], ContextManager] | None = None
    per_head: bool = False  # also keep each query head's share in ``head_shares`` (B x Hq x T)
    head_shares: torch.Tensor | None = None

    def required_share(self) -> torch.Tensor:
        """``share``, or an error when the forward pass never went through the hooked attention function.

        That happens when the layer gets its attention function some other way than through its modeling file's
        AttentionInterface; selecting with zeros instead would silently train on REL alone.
        """
        if self.share is None:
            raise ConfigError(
                "the attention share was not captured: the forward pass did not go through sstoken's attention "
                "hook (the attention layer does not look its function up in transformers' AttentionInterface)"
            )
        return self.share


def _capture_share(cap: ShareCapture, module, query, key, kwargs) -> None:
    """Fill ``cap.share`` (and ``cap.head_shares`` when asked) from the query and key that the attention layer ``module`` is called with."""
    seq_len = cap.context_mask.shape[-1]
    if query.shape[2] != seq_len or key.shape[2] != seq_len:
        raise ValueError(
            f"context-share capture expects {seq_len} queries and keys (no KV cache), got "
            f"{query.shape[2]} queries and {key.shape[2]} keys"
        )
    # Models with per-layer windows pass it as a kwarg (None = full attention on this layer).
    sliding_window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    timed = contextlib.nullcontext() if cap.timer is None else cap.timer("attention_share")
    with timed:
        shares = context_share_from_qk(
            query,
            key,
            scaling,
            cap.context_mask,
            cap.key_valid,
            segment_ids=cap.segment_ids,
            sliding_window=sliding_window,
            chunk_size=cap.chunk_size,
            softcap=kwargs.get("softcap"),
            sinks=kwargs.get("s_aux"),
            per_head=cap.per_head,
        )
        if cap.per_head:
            cap.head_shares, shares = shares, shares.mean(dim=1)
        cap.share = shares


_WRAPPED: dict[Callable, Callable] = {}  # attention function -> its capturing wrapper (one per function)


def _capturing(function: Callable) -> Callable:
    """``function`` (an attention implementation), computing the share first when its module is being captured."""
    wrapper = _WRAPPED.get(function)
    if wrapper is None:

        @functools.wraps(function)
        def wrapper(module, query, key, value, attention_mask, *args, **kwargs):
            cap = getattr(module, _CAPTURE_ATTR, None)
            # Only the first call of a capture computes: an activation-checkpoint recompute inside the same capture
            # would produce the identical share again.
            if cap is not None and cap.share is None:
                _capture_share(cap, module, query, key, kwargs)
            return function(module, query, key, value, attention_mask, *args, **kwargs)

        _WRAPPED[function] = wrapper
    return wrapper


def _capturing_interface(interface):
    """An AttentionInterface that answers like ``interface`` with every function wrapped by :func:`_capturing`."""
    from transformers import AttentionInterface

    class CapturingAttentionInterface(AttentionInterface):
        sstoken_capturing = True

        def __init__(self):
            super().__init__()
            self._local_mapping = interface._local_mapping  # the file's own overrides, shared, not copied

        def get_interface(self, attn_implementation, default):
            return _capturing(interface.get_interface(attn_implementation, default))

        def __getitem__(self, key):
            return _capturing(interface[key])

    return CapturingAttentionInterface()


def _modeling_module_of(attention_module):
    """The Python module whose globals the attention layer's ``forward`` reads (where its class or the class it
    inherits ``forward`` from is defined: decorators do not change that)."""
    owner = next((klass for klass in type(attention_module).__mro__ if "forward" in vars(klass)), None)
    return None if owner is None else sys.modules.get(owner.__module__)


def _install_interface(attention_module) -> None:
    """Make the attention layer's modeling file answer its attention lookups through :func:`_capturing`. Once per
    file: other layers, and other models of that file, pass straight through (they carry no capture)."""
    from transformers import AttentionInterface

    module = _modeling_module_of(attention_module)
    interface = getattr(module, _INTERFACE, None)
    if not isinstance(interface, AttentionInterface):
        raise ConfigError(
            f"{type(attention_module).__name__} does not use transformers' AttentionInterface (its modeling file has "
            f"no {_INTERFACE}); the context-share probe cannot hook it"
        )
    if getattr(interface, "sstoken_capturing", False):
        return
    setattr(module, _INTERFACE, _capturing_interface(interface))


def _unwrap(model):
    """The transformers PreTrainedModel inside PEFT / DDP-style wrappers."""
    from transformers import PreTrainedModel

    model = unwrap_base_model(model)
    if not isinstance(model, PreTrainedModel):
        raise ConfigError(f"context-share probe needs a transformers model, got {type(model).__name__}")
    return model


def resolve_layer(layer: int, n_layers: int) -> int:
    """The 0-based index of decoder layer ``layer`` (negative counts from the end); ConfigError if out of range."""
    resolved = layer + n_layers if layer < 0 else layer
    if not 0 <= resolved < n_layers:
        raise ConfigError(f"attention layer {layer} is out of range for a model with {n_layers} layers")
    return resolved


def _layers_of_type(layer_types: list) -> str:
    usable = [i for i, t in enumerate(layer_types) if t in ("full_attention", "sliding_attention")]
    if not usable:
        return " (this model has none: use a selection_method without attention, such as rel, rho1 or random)"
    return f" (here: {', '.join(map(str, usable[:8]))}{', ...' if len(usable) > 8 else ''})"


class ContextShareProbe:
    """Hooks ``model``'s attention (idempotent; its implementation is left as it is) and captures the context share
    of one layer on demand."""

    def __init__(self, model, layer: int = -1, chunk_size: int = 256):
        if chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
        self.model = _unwrap(model)
        self.chunk_size = int(chunk_size)

        resolved = resolve_layer(layer, self.model.config.get_text_config().num_hidden_layers)
        self.layer_index: int = resolved
        layer_types = getattr(self.model.config.get_text_config(), "layer_types", None) or []
        layer_type = layer_types[resolved] if resolved < len(layer_types) else None
        if layer_type not in (None, "full_attention", "sliding_attention"):
            # e.g. Llama 4's chunked attention: each query sees only its own chunk, a mask the share does not
            # reproduce, so its value would be wrong rather than approximate.
            raise ConfigError(
                f"attention layer {resolved} of {type(self.model).__name__} is {layer_type!r}, whose attention share "
                f"sstoken does not compute; set attention_layer to a full or sliding attention layer"
                f"{_layers_of_type(layer_types)}"
            )

        modules = [
            m
            for m in self.model.modules()
            if "Attention" in type(m).__name__ and getattr(m, "layer_idx", None) == resolved
        ]
        if not modules:
            raise ConfigError(
                f"{type(self.model).__name__} has no attention module with layer_idx={resolved}; "
                "the context-share probe cannot hook this model"
            )
        self._module = modules[0]  # the self-attention comes first in decoder layers
        _install_interface(self._module)

    @contextlib.contextmanager
    def capture(self, context_mask, attention_mask=None, position_ids=None, timer=None, per_head: bool = False):
        """Within the block, the next forward through the target layer sets ``cap.share`` (B x T float32), and with
        ``per_head`` also ``cap.head_shares`` (B x Hq x T, whose mean over heads is ``share``).

        ``timer(name)``, when given, returns a context manager wrapped around the share's computation."""
        context_mask = torch.as_tensor(context_mask).bool()
        if attention_mask is None:
            key_valid = torch.ones_like(context_mask)
        else:
            key_valid = torch.as_tensor(attention_mask).bool()
        segment_ids = None if position_ids is None else segment_ids_from_position_ids(position_ids)
        if segment_ids is not None and segment_ids.shape[0] != context_mask.shape[0]:
            segment_ids = segment_ids.expand(context_mask.shape[0], -1)
        cap = ShareCapture(context_mask, key_valid, segment_ids, self.chunk_size, timer=timer, per_head=per_head)

        previous = getattr(self._module, _CAPTURE_ATTR, None)
        setattr(self._module, _CAPTURE_ATTR, cap)
        try:
            yield cap
        finally:
            if previous is None:
                delattr(self._module, _CAPTURE_ATTR)
            else:
                setattr(self._module, _CAPTURE_ATTR, previous)


def context_share(
    model,
    input_ids,
    attention_mask,
    context_mask,
    layer: int = -1,
    position_ids=None,
    chunk_size: int = 256,
) -> torch.Tensor:
    """One no-grad forward pass; returns the B x T float32 context share of ``layer``."""
    probe = ContextShareProbe(model, layer=layer, chunk_size=chunk_size)
    with torch.no_grad(), probe.capture(context_mask, attention_mask, position_ids) as cap:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    if cap.share is None:
        raise RuntimeError(f"the forward pass never reached attention layer {probe.layer_index}")
    return cap.share
