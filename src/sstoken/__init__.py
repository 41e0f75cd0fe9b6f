"""sstoken: self-modulated and semantic-aware token selection for LLM fine-tuning.

The maths lives in :mod:`sstoken.scoring` (pure tensor functions) and :mod:`sstoken.attention`
(the context-attention share computed inside the model's own attention call); the training glue lives
in :mod:`sstoken.trainer`.
"""

__version__ = "0.1.0"

from sstoken.errors import ConfigError, DataError, SSTokenError  # noqa: E402

__all__ = ["ConfigError", "DataError", "SSTokenError", "__version__"]
