"""sstoken: self-modulated and semantic-aware token selection for LLM fine-tuning.

The maths lives in :mod:`sstoken.scoring` (pure tensor functions) and :mod:`sstoken.attention`
(the context-attention share computed inside the model's own attention call); the training glue lives
in :mod:`sstoken.trainer`.
"""

__version__ = "0.1.0"

from sstoken.errors import ConfigError, DataError, SSTokenError  # noqa: E402

_LAZY = {"SSTokenConfig": "sstoken.trainer", "SSTokenTrainer": "sstoken.trainer",
         "sstoken_mask": "sstoken.scoring", "context_share": "sstoken.attention"}


def __getattr__(name):
    # The trainer pulls in TRL and transformers; import it only when asked for.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sstoken' has no attribute {name!r}")


__all__ = ["ConfigError", "DataError", "SSTokenError", "__version__", *_LAZY]
