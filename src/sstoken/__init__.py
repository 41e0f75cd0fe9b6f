"""sstoken: self-modulated and semantic-aware token selection for LLM fine-tuning.

The maths lives in :mod:`sstoken.selection.scoring` (pure tensor functions) and :mod:`sstoken.selection.attention`
(the context-attention share computed inside the model's own attention call); the training glue lives
in :mod:`sstoken.training.trainer`.
"""

__version__ = "0.1.0"

from sstoken.errors import ConfigError, DataError, SSTokenError  # noqa: E402

_LAZY = {"SSTokenConfig": "sstoken.training.config", "SSTokenTrainer": "sstoken.training.trainer",
         "sstoken_mask": "sstoken.selection.scoring", "context_share": "sstoken.selection.attention"}


def __getattr__(name):
    # The trainer pulls in TRL and transformers; import it only when asked for.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sstoken' has no attribute {name!r}")


__all__ = ["ConfigError", "DataError", "SSTokenError", "__version__", *_LAZY]
