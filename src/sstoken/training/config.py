"""SSTokenConfig: TRL's ``SFTConfig`` plus the selection fields, validated before any model loads.

Every ``SFTConfig`` field is honoured or refused with a one-line reason (:mod:`sstoken.training.field_policy`);
the selection fields are checked against the selector registry (:mod:`sstoken.selection.selectors`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass, field

import torch
from trl import SFTConfig

from sstoken.batch import unwrap_base_model
from sstoken.errors import ConfigError, did_you_mean, shown
from sstoken.selection.history import EMA_SHARDED_MESSAGE, check_ema_decay, check_ema_interval
from sstoken.selection.selectors import SELECTORS, Selector, make_selector

HISTORY_MODES = ("base", "ema")


NO_TRUNCATION = 2**62  # the max_length that truncates nothing

LOSS_TYPES = ("nll", "dft", "chunked_nll")
"""TRL's ``loss_type`` values: the NLL, Dynamic Fine-Tuning (each kept token weighted by its detached probability),
and TRL's deprecated alias of nll."""


@dataclass
class SSTokenConfig(SFTConfig):
    """SFTConfig plus the token-selection settings (all optional; defaults are the paper's)."""

    selection_method: str = field(
        default="sstoken",
        metadata={"help": f"Token selector: one of {', '.join(SELECTORS)}."},
    )
    rho: float = field(default=0.6, metadata={"help": "Fraction of each sample's response tokens kept, in (0, 1]."})
    gamma: float = field(default=0.5, metadata={"help": "Weight of normalised REL against the attention share, in [0, 1]."})
    attention_warmup: float = field(
        default=0.0,
        metadata={"help": "Fraction of training steps that select by attention alone (gamma=0) before REL is used."},
    )
    attention_layer: int = field(default=-1, metadata={"help": "Decoder layer whose attention share is used (-1 = last)."})
    attention_chunk_size: int = field(default=256, metadata={"help": "Query positions per chunk for the attention share."})
    history: str = field(default="base", metadata={"help": "History model: 'base' (frozen base) or 'ema'."})
    history_cache: str | None = field(
        default=None,
        metadata={"help": "Directory of base-model NLLs from `sstoken cache` (history 'base' then costs no forward)."},
    )
    reference_cache: str | None = field(
        default=None, metadata={"help": "Directory of reference-model NLLs from `sstoken cache` (rho1, tokencleaning)."}
    )
    ema_decay: float = field(default=0.99, metadata={"help": "EMA history: theta_his <- a*theta_his + (1-a)*theta."})
    ema_interval: int = field(default=1, metadata={"help": "EMA history: optimizer steps between updates."})
    nll_chunk_size: int = field(
        default=1024, metadata={"help": "Positions per chunk of per-token NLL from full logits (fallback path only)."})
    selection_seed: int = field(default=0, metadata={"help": "Seed of the random selector."})
    # TRL defaults the deprecated alias `gradient_checkpointing` to True, which makes transformers 5 emit a
    # FutureWarning on every run. Both default to None here; __post_init__ applies TRL's default under the current
    # name when neither is given, so the behaviour is TRL's and a value passed under either name is kept.
    activation_checkpointing: bool | None = field(
        default=None, metadata={"help": "Recompute activations in the backward pass to save memory (default on)."}
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of activation_checkpointing (transformers 5)."}
    )
    # TRL's default False means "train on the whole conversation", which sstoken never does; None (unset) lets an
    # explicit False be refused instead of silently ignored (see SFT_FIELD_POLICY).
    assistant_only_loss: bool | None = field(
        default=None,
        metadata={"help": "sstoken always trains on assistant turns only: leave unset or true; false is refused."},
    )

    def __post_init__(self):
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # TRL's default
        check_sft_fields(self)  # before TRL's __post_init__, which rewrites some of them
        if self.bf16 is None and not self.fp16:
            # TRL turns bf16 on by default, which transformers refuses on a machine without bf16 support.
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()) and not self.use_cpu
        if self.use_cpu or not torch.cuda.is_available():
            # Pinned memory only speeds up copies to an accelerator; on a CPU run torch warns about it every run.
            self.dataloader_pin_memory = False
        super().__post_init__()
        validate_selection_args(self)


# Values of TRL fields that ask for something sstoken's loss or encoding does not do (see SFT_FIELD_POLICY).
def check_sft_fields(args) -> None:
    """Refuse TRL settings that sstoken would otherwise silently ignore; one-line ConfigError each."""
    if args.loss_type not in LOSS_TYPES:
        raise ConfigError(f"loss_type must be 'nll' or 'dft', got {shown(args.loss_type)}"
                          f"{did_you_mean(str(args.loss_type), LOSS_TYPES)}")
    if args.loss_type == "dft" and args.label_smoothing_factor:
        raise ConfigError("loss_type 'dft' weighs each token's NLL of its label by the label's probability; label "
                          "smoothing spreads the loss over other tokens, which DFT does not weigh (TRL ignores it "
                          "under dft): set one of them")
    if args.completion_only_loss is False:
        raise ConfigError("sstoken always trains on the completion (response) tokens only; completion_only_loss "
                          "false is not supported (remove it)")
    if args.assistant_only_loss is False:
        raise ConfigError("sstoken always trains on the assistant turns only; assistant_only_loss false is not "
                          "supported (remove it)")
    if args.dataset_text_field != "text":
        raise ConfigError(f"dataset_text_field {shown(args.dataset_text_field)}: sstoken reads language-modelling "
                          f"rows from a 'text' column only; rename the column to 'text' (or use chat or "
                          f"prompt/completion rows)")
    if args.truncation_mode != "keep_start":
        raise ConfigError(f"truncation_mode must be 'keep_start' (sstoken's encoding keeps the start of a row), got "
                          f"{shown(args.truncation_mode)}")
    if args.label_names not in (None, ["labels"]):
        raise ConfigError(f"label_names must be unset or ['labels'] (sstoken reads the labels column), got "
                          f"{shown(args.label_names)}")
    check_liger_kernel(args)
    if args.padding_free and not args.packing and args.max_length is not None:
        # TRL refuses this too, but only once the model has loaded.
        raise ConfigError("padding_free without packing does not enforce max_length; set packing: true, or "
                          "padding_free: false")
    check_chat_template_path(args.chat_template_path)


# TRL's floor for liger-kernel (trl.import_utils.LIGER_KERNEL_MIN_VERSION); transformers' own is lower.
LIGER_KERNEL_MIN_VERSION = "0.8.2"


def check_liger_kernel(args) -> None:
    """``use_liger_kernel``: Liger's layer kernels (RMSNorm, RoPE, SwiGLU / GeGLU, ...) under sstoken's own LM head.

    transformers' Trainer patches the model with them when training starts, and TRL's SFTTrainer passes
    ``fused_linear_cross_entropy=False``, so the model's forward, its LM head and the attention layers the probe
    hooks stay as they are; only the layers inside the backbone change. Refused here, before the model loads:
    Liger's fused linear cross-entropy (it replaces the forward and returns a reduced loss, never the per-token
    NLL that selection ranks), a missing or too old liger-kernel (transformers would fail only when training
    starts), and a run without a GPU (the kernels are Triton GPU kernels)."""
    config = args.liger_kernel_config
    if not args.use_liger_kernel:
        if config:
            raise ConfigError("liger_kernel_config only applies with use_liger_kernel: true")
        return
    if config is not None and not isinstance(config, dict):
        raise ConfigError(f"liger_kernel_config must be a mapping of Liger options, got {type(config).__name__}")
    if (config or {}).get("fused_linear_cross_entropy"):
        raise ConfigError("liger_kernel_config fused_linear_cross_entropy: true is not supported: Liger's fused loss "
                          "replaces the model's forward and returns only the mean loss, while sstoken selects tokens "
                          "by the per-token NLL of its own LM head (Liger's other kernels do apply)")
    if args.use_cpu or not _has_gpu():
        raise ConfigError("use_liger_kernel needs a GPU: Liger's kernels are Triton GPU kernels")
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("use_liger_kernel needs liger-kernel: pip install liger-kernel")
    from packaging.version import Version

    installed = importlib.metadata.version("liger-kernel")
    if Version(installed) < Version(LIGER_KERNEL_MIN_VERSION):
        raise ConfigError(f"use_liger_kernel needs liger-kernel >= {LIGER_KERNEL_MIN_VERSION} (installed: "
                          f"{installed}): pip install -U liger-kernel")


def _has_gpu() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or bool(xpu is not None and xpu.is_available())


def check_chat_template_path(path: str | None) -> None:
    """A chat template sstoken can apply before encoding: a Jinja file. (TRL also clones one from another
    tokenizer, which adds tokens and resizes the model's embeddings: not possible before the model exists.)"""
    if path is None:
        return
    if not isinstance(path, str) or not path.endswith((".jinja", ".j2")):
        raise ConfigError(f"chat_template_path must be a .jinja or .j2 file, got {shown(path)} (save the other "
                          f"tokenizer's chat_template to a file; cloning from a tokenizer is not supported)")
    if not os.path.isfile(os.path.expanduser(path)):
        raise ConfigError(f"chat_template_path {path} does not exist")


def apply_tokenizer_settings(tokenizer, args) -> None:
    """Apply ``eos_token`` and ``chat_template_path`` to ``tokenizer`` in place, as TRL's SFTTrainer would.

    sstoken encodes raw rows before SFTTrainer sees them, so this must run before encoding: otherwise the data
    would use the tokenizer's old template and EOS while the saved tokenizer has the new ones. (TRL applies the
    same values again later, which changes nothing, and mirrors the EOS onto the model config.)"""
    if args.eos_token is not None:
        if args.eos_token not in tokenizer.get_vocab():
            raise ConfigError(f"eos_token {shown(args.eos_token)} is not in the tokenizer's vocabulary")
        tokenizer.eos_token = args.eos_token
    if args.chat_template_path is not None:
        check_chat_template_path(args.chat_template_path)
        with open(os.path.expanduser(args.chat_template_path), encoding="utf-8") as handle:
            tokenizer.chat_template = handle.read()


def validate_selection_args(args) -> None:
    """Check the selection fields before any model is loaded; raises ConfigError with the fix."""
    selector = selector_of(args)  # checks the method, rho, gamma and attention_warmup
    if args.history not in HISTORY_MODES:
        raise ConfigError(f"history must be one of {', '.join(HISTORY_MODES)}, got {args.history!r}"
                          f"{did_you_mean(args.history, HISTORY_MODES)}")
    if args.history == "ema":
        check_ema_decay(args.ema_decay)
    check_ema_interval(args.ema_interval)
    if args.attention_chunk_size < 1 or args.nll_chunk_size < 1:
        raise ConfigError("attention_chunk_size and nll_chunk_size must be >= 1")
    if selector.needs_reference and not args.reference_cache:
        raise ConfigError(f"selection_method {selector.name!r} needs reference_cache (build it with "
                          f"`sstoken cache --model <reference model>`)")
    if selector.needs_cached_counts and not args.history_cache:
        raise ConfigError(f"selection_method {selector.name!r} needs history_cache (the base model's NLL cache)")
    if args.history == "ema" and args.history_cache:
        raise ConfigError("history 'ema' changes during training and cannot use history_cache; remove one of them")
    if selector.cannot_pack_because and args.packing:
        raise ConfigError(f"selection_method {selector.name!r} {selector.cannot_pack_because} and cannot run on "
                          f"packed sequences; set packing: false")
    check_training_engine(args)


def training_engine(args) -> str:
    """How accelerate will hold the weights: "deepspeed-zero3", "deepspeed" (ZeRO stages 0-2: replicated
    parameters), "fsdp2", "fsdp1", or "replicated" (one process, or DDP). From the training arguments (``fsdp`` /
    ``fsdp_config``, ``deepspeed``) or, as the Trainer's accelerator reads it, from ``accelerate launch``'s
    environment."""
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None:
        return "deepspeed-zero3" if plugin.zero_stage == 3 else "deepspeed"
    fsdp = getattr(args, "fsdp_plugin_args", None)
    if fsdp is not None:
        version = int(fsdp.get("fsdp_version", 2))
    elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes"):
        version = int(os.environ.get("FSDP_VERSION", "1"))  # accelerate's default
    else:
        return "replicated"
    return "fsdp2" if version == 2 else "fsdp1"


SHARDED_ENGINES = ("fsdp2", "deepspeed-zero3")


def _model_parallel_sizes(args) -> dict[str, int]:
    """tp_size, cp_size and sp_size of accelerate's parallelism config (the training arguments' or the launch's)."""
    config = getattr(args, "parallelism_config", None)
    sizes = {}
    for name in ("tp_size", "cp_size", "sp_size"):
        value = getattr(config, name, None) if config is not None else None
        if value is None:
            value = os.environ.get(f"PARALLELISM_CONFIG_{name.upper()}", 1)
        sizes[name] = int(value)
    return sizes


def check_training_engine(args) -> None:
    """Refuse, before the model loads, the engine settings sstoken has not been proven under (docs/scaling.md)."""
    engine = training_engine(args)
    if engine == "fsdp1":
        raise ConfigError("FSDP version 1 is not supported (its flattened parameters are untested with sstoken's "
                          "head and history); use FSDP2: fsdp_version: 2 in the accelerate config, or "
                          "fsdp_config: {version: 2}")
    split = {name: size for name, size in _model_parallel_sizes(args).items() if size > 1}
    if split:
        # Tensor parallelism splits the LM head's weight across ranks inside the forward; context and sequence
        # parallelism split a sequence, while the attention share of a query needs every key of its sequence.
        raise ConfigError(f"parallelism_config {', '.join(f'{k}={v}' for k, v in split.items())} is not supported: "
                          f"sstoken's LM head needs the whole vocabulary on each rank and its attention share the "
                          f"whole sequence; use data parallelism (DDP, FSDP2 or DeepSpeed ZeRO)")
    if engine in SHARDED_ENGINES and args.history == "ema" and selector_of(args).needs_history:
        raise ConfigError(EMA_SHARDED_MESSAGE)


DFT_METHOD = "dft"
"""The method name of plain SFT with DFT's loss (selection_method full, loss_type dft); ``<selector>+dft`` is that
selector with DFT's weights on its kept tokens."""


def method_names() -> list[str]:
    """The method names ``sstoken compare`` and the benchmarks take: every selector, then ``dft``."""
    return [*SELECTORS, DFT_METHOD]


def method_settings(method: str) -> dict[str, str]:
    """The config settings of a method name: ``{"selection_method": ...}``, plus ``{"loss_type": "dft"}`` for
    ``dft`` (full SFT with DFT's loss) and ``<selector>+dft`` (e.g. ``sstoken+dft``)."""
    selector, dft = method, False
    if method == DFT_METHOD:
        selector, dft = "full", True
    elif isinstance(method, str) and method.endswith(f"+{DFT_METHOD}"):
        selector, dft = method[: -len(DFT_METHOD) - 1], True
    if selector not in SELECTORS:
        candidates = [*method_names(), *(f"{name}+{DFT_METHOD}" for name in SELECTORS)]
        raise ConfigError(f"unknown method {shown(method)}{did_you_mean(str(method), candidates)}; choose from "
                          f"{', '.join(method_names())}, or <selection method>+dft (e.g. sstoken+dft)")
    return {"selection_method": selector, **({"loss_type": DFT_METHOD} if dft else {})}


def check_one_device_per_process(args, model=None) -> None:
    """Refuse several GPUs driven by one process: transformers' Trainer wraps the model in ``nn.DataParallel``
    there, whose replicas would share one attention-share capture and one head request while each sees a slice of
    the batch. ``model``: the model the trainer gets (a path or None: sstoken loads it with
    ``model_init_kwargs``). A model placed by a device map is left alone: the Trainer drives one that spans several
    GPUs as a single model-parallel model (and TRL refuses the rest once the Trainer is built)."""
    if args.n_gpu <= 1:
        return
    if model is None or isinstance(model, str):
        device_map = (args.model_init_kwargs or {}).get("device_map")
    else:
        device_map = getattr(unwrap_base_model(model), "hf_device_map", None)
    if device_map is None:
        raise ConfigError(f"{args.n_gpu} GPUs are visible to one process, which transformers would drive with "
                          f"nn.DataParallel; sstoken trains one process per GPU: launch with `accelerate launch` or "
                          f"`torchrun --nproc_per_node {args.n_gpu}` (or make one GPU visible, CUDA_VISIBLE_DEVICES=0)")


def selector_of(args) -> Selector:
    return make_selector(args.selection_method, args.rho, args.gamma, args.attention_warmup, args.selection_seed)


def check_history_source(args, trains_an_adapter: bool) -> None:
    """History 'base' without a cache is the model with its adapter switched off: full fine-tuning has none."""
    selector = selector_of(args)
    if selector.needs_history and args.history == "base" and not args.history_cache and not trains_an_adapter:
        raise ConfigError("full fine-tuning (no lora) with history 'base' needs history_cache: the base model's NLL "
                          "must be computed before its weights change; build it with `sstoken cache`, or use "
                          "history: ema, or train a LoRA adapter")
