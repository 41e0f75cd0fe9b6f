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
