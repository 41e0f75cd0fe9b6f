"""Shared test set-up and fixtures.

The benchmarks in ``benchmarks/`` are scripts run from the repository, not part of the package; their modules
import each other by bare name (``import common``), as they do when run as ``python benchmarks/overhead.py``.
Putting the folder on ``sys.path`` here lets the tests import them the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO_ROOT / "benchmarks"

if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """The tiny random llama (seed 0) and its tokenizer as a checkpoint folder, saved once per session.

    Shared by every test that needs a model path: tests read it and must not write into it."""
    from sstoken.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture(scope="session")
def tok():
    """The tiny ChatML tokenizer (one shared, cached instance: tests must not change it)."""
    from sstoken.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session", autouse=True)
def private_encoding_cache(tmp_path_factory):
    """sstoken caches encoded data in the user's datasets cache; the tests encode many short-lived files, so their
    encodings go to a session folder instead."""
    from sstoken.data import sources

    folder = tmp_path_factory.mktemp("encoded")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sources, "encoding_cache_dir", lambda: folder)
        yield folder


@pytest.fixture
def rendered_messages(monkeypatch):
    """Counts the messages the data code renders with the chat template (``counter["messages"]``): long-chat tests
    check that the work grows with the row, not with its square."""
    from sstoken.data import templates

    counter = {"messages": 0}
    real_render = templates.render_chat

    def counting_render(tokenizer, messages, add_generation_prompt, **kwargs):
        counter["messages"] += len(messages)
        return real_render(tokenizer, messages, add_generation_prompt, **kwargs)

    monkeypatch.setattr(templates, "render_chat", counting_render)
    return counter


# ----------------------------------------------------------------------------------------------- flash stand-ins
def _standin_attention(q, k, v, causal, softmax_scale, window_size):
    """One sequence in flash-attn's layout, (T, heads, d) with GQA, computed by SDPA."""
    import torch
    import torch.nn.functional as F

    length, group = q.shape[0], q.shape[1] // k.shape[1]
    q, k, v = (x.transpose(0, 1) for x in (q, k, v))
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    query_pos, key_pos = torch.arange(length)[:, None], torch.arange(length)[None]
    visible = torch.ones(length, length, dtype=torch.bool)
    if causal:
        visible &= key_pos <= query_pos
    if window_size[0] >= 0:
        visible &= query_pos - key_pos <= window_size[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=softmax_scale).transpose(0, 1)


def _standin_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             deterministic=False):
    import torch

    return torch.stack([_standin_attention(q[b], k[b], v[b], causal, softmax_scale, window_size)
                        for b in range(q.shape[0])])


def _standin_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                                    dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                    deterministic=False):
    import torch

    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for start, stop in zip(bounds[:-1], bounds[1:]):
        out[start:stop] = _standin_attention(q[start:stop], k[start:stop], v[start:stop], causal, softmax_scale,
                                             window_size)
    return out


@pytest.fixture
def flash_attention_2_standin(monkeypatch):
    """``attn_implementation="flash_attention_2"`` on this CPU: a stand-in ``flash_attn`` package whose kernels are
    SDPA, so that transformers' own flash path (its dispatch on the implementation's name, unpadding, varlen calls
    for padded and packed rows) runs for real around it."""
    import importlib.machinery
    import types

    import transformers.modeling_flash_attention_utils as flash_utils
    from transformers import PreTrainedModel

    package = types.ModuleType("flash_attn")
    package.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    package.flash_attn_func = _standin_flash_attn_func
    package.flash_attn_varlen_func = _standin_flash_attn_varlen_func
    package.flash_attn_with_kvcache = None
    padding = types.ModuleType("flash_attn.bert_padding")
    padding.pad_input, padding.unpad_input = flash_utils._pad_input, flash_utils._unpad_input
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.bert_padding", padding)
    monkeypatch.setattr(flash_utils, "is_flash_attn_2_available", lambda: True)
    monkeypatch.setitem(flash_utils.FLASH_ATTENTION_COMPATIBILITY_MATRIX[2], "general_availability_check", lambda: True)
    monkeypatch.setattr(PreTrainedModel, "_flash_attn_can_dispatch", lambda self, *args, **kwargs: True)
    monkeypatch.setattr(flash_utils, "_loaded_implementation", None)  # the stand-in's functions are not kept
    return "flash_attention_2"


@pytest.fixture
def hub_kernel_standin(monkeypatch):
    """``attn_implementation="kernels-community/flash-attn3"`` offline: the Hub download (``kernels.get_kernel``)
    returns a module holding the stand-in flash functions; transformers registers and dispatches it as it would the
    real kernel."""
    import types

    import transformers.integrations.hub_kernels as hub_kernels
    import transformers.modeling_flash_attention_utils as flash_utils
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    name = "kernels-community/flash-attn3"
    kernel = types.ModuleType("flash_attn3_standin")
    kernel.flash_attn_func = _standin_flash_attn_func
    kernel.flash_attn_varlen_func = _standin_flash_attn_varlen_func
    kernel.flash_attn_with_kvcache = None

    def get_kernel(repo_id, revision=None, version=None, **kwargs):
        if repo_id != name:
            raise ValueError(f"the offline stand-in has no kernel {repo_id!r}")
        return kernel

    monkeypatch.setattr(hub_kernels, "get_kernel", get_kernel)
    monkeypatch.setattr(flash_utils, "_loaded_implementation", None)
    # transformers registers the kernel by name when a model asks for it; undone after the test.
    monkeypatch.setitem(AttentionInterface._global_mapping, name, None)
    monkeypatch.setitem(AttentionMaskInterface._global_mapping, name, None)
    return name
