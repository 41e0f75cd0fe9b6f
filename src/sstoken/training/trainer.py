"""SSTokenTrainer: TRL's SFTTrainer with token selection (its config: :mod:`sstoken.training.config`).

A TRL user switches by changing the class::

    trainer = SSTokenTrainer(model=model, args=SSTokenConfig(output_dir="out", rho=0.6, gamma=0.5),
                             train_dataset=dataset, peft_config=LoraConfig(...))

One training step (:func:`sstoken.signals.select_tokens`, shared with ``sstoken inspect``): history NLL (cache
lookup, or a no-grad pass with the adapter disabled / the EMA weights swapped in) → forward once (the attention
share of one layer is captured inside that forward) → per-token NLL of the current model, without gradient →
keep mask → cross-entropy with gradient on kept tokens only.
Every per-token NLL and the loss come from the hidden states through sstoken's head (:mod:`sstoken.lm_head`):
no B×T×V logits, the prompt never projected, and the backward projecting only the kept tokens. Label smoothing,
or a model whose logits that head cannot reproduce, falls back to the full logits (logged once).

Loss normalisation (the rule, also under gradient accumulation and several ranks): the loss of an optimizer
step is the sum of kept-token NLLs, each times its token weight, divided by the number of kept tokens in the
whole step (not the sum of their weights), summed over the accumulated micro-batches and, with
``average_tokens_across_devices`` (the default), over all ranks. Since ρ fixes how many tokens each sample keeps
(ceil(ρ·n)), that count is known before the forward pass, so accumulating 2 micro-batches of b samples gives the
same gradient as one batch of 2b samples, weighted or not. Token weights are 1 unless the data has ``weight``
fields, the selector weighs tokens, or ``loss_type`` is ``"dft"`` (Dynamic Fine-Tuning: each kept token weighted
by its probability under the current model, from the same no-grad NLL that selection reads, as TRL computes it).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from sstoken.batch import TOKEN_WEIGHTS, unwrap_model
from sstoken.errors import ConfigError
from sstoken.io import atomic_path
from sstoken.models import keep_cpu_4bit_layers_trainable, quiet_peft_wrapping
from sstoken.selection import lm_head, scoring
from sstoken.selection.history import EMAHistory
from sstoken.selection.nll_cache import CacheFingerprints, NLLCache
from sstoken.selection.selectors import Signals
from sstoken.selection.signals import (
    BaseModelHistory,
    BatchLayout,
    CachedHistory,
    EMAModelHistory,
    PartTimer,
    SignalSources,
    select_tokens,
)
from sstoken.training.config import (
    NO_TRUNCATION,
    SSTokenConfig,
    apply_tokenizer_settings,
    check_history_source,
    check_one_device_per_process,
    selector_of,
)
from sstoken.training.collation import TokenWeightsCollator, pack_with_weights
from sstoken.training.guards import DroppedGradients, FiniteWeightsGuard, drop_gradients
from sstoken.training.snapshots import SelectionSnapshots

logger = logging.getLogger(__name__)

STATE_FILE = "sstoken_state.safetensors"
_UNDECIDED = object()  # full_logits_reason before its first use


@dataclass(frozen=True)
class SelectionEvent:
    """One training micro-batch's selection, as passed to each selection listener."""

    trainer: "SSTokenTrainer"
    inputs: dict[str, Any]  # the batch as compute_loss received it (input_ids, labels, attention_mask, ...)
    signals: Signals
    keep: torch.Tensor  # B×T bool, the tokens that carry the loss
    progress: float  # fraction of training done, as the selector saw it
    step: int  # the optimizer step this micro-batch belongs to (1-based, as in log_history)
    weights: torch.Tensor | None = None  # B×T loss weight of each response token (data × selector × DFT); None: 1


SelectionListener = Callable[[SelectionEvent], None]


class _EMACallback(TrainerCallback):
    def __init__(self, trainer: "SSTokenTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.ema is not None:
            with self.trainer.timed_part("ema_update"):
                self.trainer.ema.update(state.global_step)


def _embedding_rows(model) -> int | None:
    """Rows of the model's input embedding (its vocabulary as trained), or None for a model without one."""
    try:
        return int(model.get_input_embeddings().weight.shape[0])
    except (AttributeError, NotImplementedError):
        return None


def _base_config_missing(model) -> bool:
    """Whether ``model`` is a PEFT model whose base model is a local folder without config.json: a GGUF file's
    folder, whose config only the GGUF file holds."""
    configs = getattr(model, "peft_config", None)
    bases = {getattr(c, "base_model_name_or_path", None) for c in configs.values()} if isinstance(configs, dict) else ()
    return any(b and os.path.isdir(b) and not os.path.isfile(os.path.join(b, "config.json")) for b in bases)


class SSTokenTrainer(SFTTrainer):
    """TRL's SFTTrainer whose loss covers only the response tokens chosen by a token selector.

    Two public hooks, for tools that watch selection without changing it (``sstoken report``'s snapshots, the
    benchmarks in ``benchmarks/``):

    * ``selection_listeners=[fn, ...]`` (or :meth:`add_selection_listener`): ``fn(event)`` is called with a
      :class:`SelectionEvent` after every training micro-batch's selection;
    * ``part_timer=fn``: ``fn(name)`` returns a context manager wrapped around each piece of work selection adds
      to a step (``history``, ``attention_share``, ``select``, ``logging``, ``ema_update``), e.g. to time them.
    """

    loss_is_scaled_for_ga = True  # compute_loss divides by the kept count of the whole accumulated step
    # Read by TRL when it writes the model card (README.md of the output folder).
    _tag_names = ["trl", "sft", "sstoken"]
    _name = "SFT with ssToken token selection"
    _paper = {
        "title": "ssToken: Self-modulated and Semantic-aware Token Selection for LLM Fine-tuning",
        "id": "2510.18250",
        "citation": (
            "@inproceedings{qin2026sstoken,\n"
            "    title     = {{ssToken: Self-modulated and Semantic-aware Token Selection for LLM Fine-tuning}},\n"
            "    author    = {Qin, X. and Wang, X. and Liao, N. and Zhang, C. and Zhang, X. and Feng, M. and "
            "Wang, J. and Yan, J.},\n"
            "    booktitle = {The Fourteenth International Conference on Learning Representations (ICLR)},\n"
            "    year      = 2026,\n"
            "    eprint    = {arXiv:2510.18250},\n"
            "}"
        ),
    }

    def __init__(self, *args, selection_listeners: list[SelectionListener] | None = None,
                 part_timer: PartTimer | None = None, **kwargs):
        sst_args = kwargs.get("args")
        if sst_args is None and len(args) > 1:
            sst_args = args[1]
        if not isinstance(sst_args, SSTokenConfig):
            raise ConfigError("SSTokenTrainer needs args=SSTokenConfig(...)")
        model = kwargs.get("model", args[0] if args else None)
        check_one_device_per_process(sst_args, model)
        if sst_args.model_init_kwargs is not None and model is not None and not isinstance(model, str):
            raise ConfigError("model_init_kwargs only applies when model is a path; the model passed is already "
                              "built (pass its path, or load it with those arguments yourself)")
        processing_class = kwargs.get("processing_class")
        if processing_class is None and isinstance(model, str):
            # Loaded here rather than by SFTTrainer, so that the data is encoded by the tokenizer that is saved.
            processing_class = kwargs["processing_class"] = _load_tokenizer(model, sst_args)
        if processing_class is not None:
            apply_tokenizer_settings(processing_class, sst_args)
        train_dataset = kwargs.get("train_dataset")
        train_columns = _columns_of(train_dataset)
        if _needs_sstoken_encoding(train_columns):
            why = _why_text_is_refused(sst_args)
            if why and _is_stream(train_dataset) and _only_text(train_columns):
                # No row of a stream is counted before training; one with nothing but text is refused now.
                raise ConfigError(f"train_dataset: the streamed rows are plain text {why}")
            kwargs["train_dataset"], stats = _encode_dataset(train_dataset, processing_class, sst_args,
                                                             "train_dataset", text_refusal=why)
            check_text_rows(stats, sst_args, "train_dataset")
        # An evaluation set is encoded exactly like the training set (assistant-only labels), so that its loss
        # is the response NLL; TRL alone would train on / score whole sequences for raw rows.
        eval_dataset = kwargs.get("eval_dataset")
        if isinstance(eval_dataset, dict):
            kwargs["eval_dataset"] = {
                name: _encode_dataset(part, processing_class, sst_args, f"eval_dataset[{name}]")[0]
                if _needs_sstoken_encoding(_columns_of(part)) else part for name, part in eval_dataset.items()}
        elif _needs_sstoken_encoding(_columns_of(eval_dataset)):
            kwargs["eval_dataset"], _ = _encode_dataset(eval_dataset, processing_class, sst_args, "eval_dataset")
        with quiet_peft_wrapping(), _trl_sees_no_assistant_only_loss(sst_args):
            super().__init__(*args, **kwargs)
        # The data's loss weights (weight fields) ride in a token_weights column that TRL's collator would drop.
        self.weighted_data = _has_token_weights(self.train_dataset)
        if (self.weighted_data or _has_token_weights(self.eval_dataset)) and \
                isinstance(self.data_collator, DataCollatorForLanguageModeling):
            self.data_collator = TokenWeightsCollator(self.data_collator)
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.args.world_size == 1:
            # e.g. `accelerate launch` on a CPU-only machine without use_cpu: N independent runs would
            # silently write to the same output_dir.
            raise ConfigError(f"launched as {launched} processes but training would run as 1 (no distributed "
                              f"backend was set up); on CPUs set use_cpu: true (accelerate config: use_cpu)")
        check_history_source(sst_args, trains_an_adapter=hasattr(unwrap_model(self.model), "disable_adapter"))
        self._vocabulary_at_start = _embedding_rows(unwrap_model(self.model))
        self.selector = selector_of(sst_args)
        self.part_timer = part_timer
        # Distributions of REL / attention share at a few steps, for `sstoken report` (selection_snapshots.json).
        self._snapshots = SelectionSnapshots()
        self.selection_listeners: list[SelectionListener] = [self._snapshots, *(selection_listeners or [])]
        self._probe = None
        self.history_cache = self._open_cache(sst_args.history_cache, "history cache") \
            if sst_args.history_cache else None
        self.reference_cache = self._open_cache(sst_args.reference_cache, "reference cache") \
            if sst_args.reference_cache else None
        self.ema = None
        if self.selector.needs_history and sst_args.history == "ema":
            self.ema = EMAHistory(unwrap_model(self.model), sst_args.ema_decay, sst_args.ema_interval)
            self.add_callback(_EMACallback(self))
        self.selector.prepare(self.train_dataset, self.history_cache, self.reference_cache)
        self.add_callback(FiniteWeightsGuard())
        self.skipped_nonfinite_steps = 0
        self._dropped_gradients: DroppedGradients | None = None
        self._full_logits_reason: str | None | object = _UNDECIDED
        # Patched now, before accelerate wraps the forward in its mixed-precision autocast, so that the autocast
        # covers sstoken's head as it covers the model's own; whether the head is used is decided on first use.
        lm_head.add_sstoken_head(self.model)
        keep_cpu_4bit_layers_trainable(self.model)  # before the head check runs the model in eval mode
        if self.selector.needs_attention:
            self._attention_probe()  # fail before training if the attention cannot be hooked

    # ---------------------------------------------------------------------------------------------- hooks
    def add_selection_listener(self, listener: SelectionListener) -> None:
        """Call ``listener(event)`` after every training micro-batch's selection (see :class:`SelectionEvent`)."""
        self.selection_listeners.append(listener)

    @property
    def selection_snapshots(self) -> list[dict]:
        """The REL / attention-share snapshots recorded so far (also in ``output_dir/selection_snapshots.json``)."""
        return self._snapshots.snapshots

    def timed_part(self, name: str) -> ContextManager:
        """``part_timer(name)``, or a context that does nothing when no timer is set."""
        return contextlib.nullcontext() if self.part_timer is None else self.part_timer(name)

    @property
    def full_logits_reason(self) -> str | None:
        """Why this run computes the NLL from the full logits; None when it uses sstoken's head.

        Decided on first use, from the model as the training engine holds it: under ZeRO-3 or FSDP the weights
        exist only once accelerate has prepared the model (before, they are partitions or, on ranks ≥ 1 with
        ``cpu_ram_efficient_loading``, meta tensors). Every rank decides at the same point, and the ranks agree
        (see :func:`sstoken.selection.lm_head.full_logits_reason`). After SFTTrainer.__init__, which sets the MoE
        config's output_router_logits from router_aux_loss_coef."""
        if self._full_logits_reason is _UNDECIDED:
            self._full_logits_reason = lm_head.use_sstoken_head(self.model, "training",
                                                                self.args.label_smoothing_factor)
        return self._full_logits_reason

    @full_logits_reason.setter
    def full_logits_reason(self, reason: str | None) -> None:
        self._full_logits_reason = reason

    # ---------------------------------------------------------------------------------------------- signals
    def _attention_probe(self):
        if self._probe is None:
            from sstoken.selection.attention import ContextShareProbe

            self._probe = ContextShareProbe(unwrap_model(self.model), layer=self.args.attention_layer,
                                            chunk_size=self.args.attention_chunk_size)
        return self._probe

    def _open_cache(self, path: str, role: str) -> NLLCache:
        # Fingerprints are checked against this run's model (a history cache only: a reference cache comes from
        # another model) and tokenizer; the data fingerprint is checked per sample at lookup time (a sample
        # missing from the cache is refused with a clear message).
        from sstoken.selection.nll_cache import model_fingerprint, tokenizer_fingerprint

        cache = NLLCache.open(path, role=role)
        expected = CacheFingerprints(
            model=model_fingerprint(self.model) if role == "history cache" else cache.fingerprints.model,
            tokenizer=tokenizer_fingerprint(self.processing_class),
            data=cache.fingerprints.data,
            max_seq_length=cache.fingerprints.max_seq_length,
        )
        wrong = expected.mismatches(cache.fingerprints)
        if wrong:
            NLLCache.open(path, expected, role=role)  # raises the detailed message
        return cache

    def _signal_sources(self) -> SignalSources:
        """Where the training signals come from: the selector's needs and this run's history settings."""
        history = None
        if self.selector.needs_history:
            if self.history_cache is not None:
                history = CachedHistory(self.history_cache)
            elif self.ema is not None:
                history = EMAModelHistory(self.ema, self.args.nll_chunk_size)
            else:
                history = BaseModelHistory(self.args.nll_chunk_size)
        return SignalSources(history=history, reference_cache=self.reference_cache,
                             probe=self._attention_probe() if self.selector.needs_attention else None,
                             sstoken_head=self.full_logits_reason is None, nll_chunk_size=self.args.nll_chunk_size)

    # ---------------------------------------------------------------------------------------------- data
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if TOKEN_WEIGHTS not in self._signature_columns:  # remove_unused_columns must keep the data's weights
            self._signature_columns = [*self._signature_columns, TOKEN_WEIGHTS]

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        # TRL packs input_ids and labels only; weighted data packs its weights with them. (Without max_length
        # TRL's own preparation refuses packing.)
        if not (packing and args.max_length is not None and TOKEN_WEIGHTS in _columns_of(dataset)):
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        from trl.trainer.utils import global_then_local_main_first

        with global_then_local_main_first():
            return pack_with_weights(dataset, args, dataset_name)

    # ---------------------------------------------------------------------------------------------- loss
    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """Kept tokens of the whole accumulated step (all ranks): the denominator of the loss."""
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        total = 0
        for batch in batch_samples:
            layout = BatchLayout.of(batch)
            response, before = layout.response, None
            if self.selector.needs_cached_counts:
                lookup = (batch["input_ids"], layout.valid, layout.segment_ids)
                before = Signals(response_mask=response, current_nll=torch.zeros_like(response, dtype=torch.float32),
                                 history_nll=self.history_cache.lookup(*lookup).cpu(),
                                 reference_nll=self.reference_cache.lookup(*lookup).cpu())
                response = response.cpu()
            kept = self.selector.expected_kept(response, layout.segment_ids, before)
            if kept is None:
                # A data-dependent budget (research selectors): the count is known only after the forward, so
                # compute_loss divides by the micro-batch's own kept count, which is the step's count only with
                # one micro-batch per step on one rank.
                if len(batch_samples) > 1 or self.args.world_size > 1:
                    raise ConfigError(f"selection_method {self.selector.name!r} knows its kept count only after the "
                                      "forward: use gradient_accumulation_steps 1 on a single process")
                return None
            total += kept
        count = torch.tensor(total, device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        training = mode == "train"
        labels = inputs["labels"]
        if training and self.weighted_data and TOKEN_WEIGHTS not in inputs:
            raise ConfigError(f"the training data has token weights (weight fields) but the data_collator "
                              f"{type(self.data_collator).__name__} drops them; leave data_collator unset (TRL's) or "
                              f"return '{TOKEN_WEIGHTS}' from it")
        # Evaluation reports the plain NLL of every response token: no history, attention or selection. A caller
        # that wants the logits back (Trainer.prediction_step, for compute_metrics) gets the model's own forward,
        # which builds them, rather than sstoken's head followed by a second forward.
        sources = self._signal_sources() if training else SignalSources(
            sstoken_head=self.full_logits_reason is None and not return_outputs,
            nll_chunk_size=self.args.nll_chunk_size)
        # TRL's entropy / accuracy cost two extra passes over each chunk of logits: only on steps that log them.
        wants_token_metrics = not training or self._logs_this_step()
        sources.head_stats = wants_token_metrics
        progress = self._progress()
        selection = select_tokens(model, inputs, self.selector, sources, progress=progress,
                                  draw_key=self._draw_key() if training else None, selecting=training,
                                  dft=self.args.loss_type == "dft", timer=self.timed_part)
        outputs, signals, keep, weights = selection.outputs, selection.signals, selection.keep, selection.weights
        response, current_nll = selection.layout.response, selection.current_nll
        if sources.sstoken_head:
            loss_sum = outputs.kept_nll_sum
        else:
            rows, cols = keep.nonzero(as_tuple=True)
            token_loss = F.cross_entropy(outputs.logits[rows, cols - 1].float(), labels[rows, cols], reduction="none",
                                         label_smoothing=self.args.label_smoothing_factor)
            loss_sum = scoring.weighted_sum(token_loss, None if weights is None else weights[rows, cols])

        loss = scoring.step_mean(loss_sum, num_items_in_batch, keep)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over ranks
        if self.aux_loss_enabled:
            loss = loss + self._weighted_aux_loss(mode, outputs, num_items_in_batch)

        # A host sync, but not an extra wait: the head's keep mask (or the full-logits path's nonzero) has already
        # synchronised on the whole forward, and what is left to compute the loss from is a few tiny ops.
        if not torch.isfinite(loss):
            self.skipped_nonfinite_steps += 1
            warnings.warn(f"non-finite loss ({loss.item()}) at step {self.state.global_step}: this micro-batch is "
                          f"skipped (no gradient); {self.skipped_nonfinite_steps} skipped so far", stacklevel=2)
            self._metrics[mode]["skipped_nonfinite"].append(float(self.skipped_nonfinite_steps))
            loss = self._skipped(loss, model)
        with self.timed_part("logging"):
            self._log_selection(mode, signals, keep, response, current_nll)
            if wants_token_metrics:
                self._log_token_metrics(mode, outputs, labels, response)
            if training:
                self._count_tokens(inputs)
        if signals is not None:
            event = SelectionEvent(trainer=self, inputs=inputs, signals=signals, keep=keep, progress=progress,
                                   step=self.state.global_step + 1, weights=weights)
            for listener in self.selection_listeners:
                listener(event)
        return (loss, outputs) if return_outputs else loss

    def _skipped(self, loss: torch.Tensor, model) -> torch.Tensor:
        """The loss that skips a non-finite micro-batch: 0, and a backward that still runs through the model (so
        that this rank joins the other ranks' gradient collectives) but adds zeros to every gradient."""
        if not (loss.requires_grad and model.training):
            return torch.zeros((), device=loss.device, requires_grad=True)  # nothing reaches a weight anyway
        self._dropped_gradients = drop_gradients(loss, model)
        return loss.nan_to_num(0.0, 0.0, 0.0)

    def training_step(self, *args, **kwargs):
        try:
            return super().training_step(*args, **kwargs)
        finally:
            if self._dropped_gradients is not None:  # the skipped micro-batch's backward has run
                self._dropped_gradients.remove()
                self._dropped_gradients = None

    def _weighted_aux_loss(self, mode: str, outputs, num_items_in_batch) -> torch.Tensor:
        """The MoE load-balancing loss, weighted as TRL weights it (its SFTTrainer.compute_loss), and logged."""
        aux_loss = getattr(outputs, "aux_loss", None)
        if aux_loss is None:
            raise RuntimeError("the MoE model returned no aux_loss although output_router_logits is set")
        self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())
        # A per-micro-batch mean that DDP averages across ranks; with num_items_in_batch the Trainer leaves gradient
        # accumulation to the loss, so it is averaged over the accumulated micro-batches.
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        return self.router_aux_loss_coef * aux_loss.to(self.accelerator.device) / steps

    def _logs_this_step(self) -> bool:
        """Whether the optimizer step now running will be logged (transformers' DefaultFlowCallback rule)."""
        step, args = self.state.global_step + 1, self.args
        if step == 1 and args.logging_first_step:
            return True
        if args.logging_strategy == "epoch":
            return True  # the epoch's last step is not known here; measured on every step
        logging_steps = self.state.logging_steps or 0
        return args.logging_strategy == "steps" and logging_steps > 0 and step % logging_steps == 0

    def _log_token_metrics(self, mode: str, outputs, labels, response) -> None:
        """TRL's ``entropy`` and ``mean_token_accuracy``, over every response token of the batch (kept or not)."""
        if isinstance(outputs, lm_head.HeadOutput):
            entropy_sum, top1_count = outputs.entropy_sum, outputs.top1_count
            count = response[:, 1:].sum()
        else:
            entropy_sum, top1_count, count = _full_logits_token_metrics(outputs.logits, labels, response,
                                                                        self.args.nll_chunk_size)
        gather = self.accelerator.gather_for_metrics
        count = gather(count.to(entropy_sum.device)).sum()
        entropy_sum, top1_count = gather(entropy_sum).sum(), gather(top1_count).sum()
        self._metrics[mode]["entropy"].append((entropy_sum / count).item() if count > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((top1_count / count).item() if count > 0 else 0.0)

    def _count_tokens(self, inputs) -> None:
        """TRL's ``num_tokens``: every input token (prompt and response, not padding) seen in training so far."""
        if "attention_mask" in inputs:
            local = inputs["attention_mask"].sum()
        else:  # padding-free batches carry position_ids instead
            local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
        self._total_train_tokens += self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]

    def _draw_key(self) -> int:
        """Distinct for every (optimizer step, micro-batch, rank); the same again after a resume."""
        step = self.state.global_step
        if step != getattr(self, "_draw_step", None):
            self._draw_step, self._draw_micro = step, 0
        micro = self._draw_micro
        self._draw_micro += 1
        return (step * 4096 + micro) * 1024 + self.args.process_index

    def _progress(self) -> float:
        max_steps = max(1, self.state.max_steps or 1)
        return self.state.global_step / max_steps

    def _log_selection(self, mode, signals: Signals | None, keep, response, current_nll):
        metrics = self._metrics[mode]
        n_response = int(response.sum().item())
        if n_response == 0:
            return
        metrics["loss_all"].append(scoring.masked_mean(current_nll, response))
        if signals is None:
            return
        metrics["kept_fraction"].append(int(keep.sum().item()) / n_response)
        metrics["loss_kept"].append(scoring.masked_mean(current_nll, keep))
        if signals.history_nll is not None:
            rel = scoring.retrospective_excess_loss(signals.history_nll.to(current_nll.device), current_nll)
            metrics["mean_rel"].append(scoring.masked_mean(rel, response))
        if signals.context_share is not None:
            metrics["mean_attention_share"].append(scoring.masked_mean(signals.context_share, response))

    # ---------------------------------------------------------------------------------------------- state
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        # PEFT's save writes a generic adapter card; the final save gets TRL's card, tagged `sstoken` and citing
        # the paper, as TRL's checkpoints do.
        if not _internal_call and (output_dir is None or os.path.abspath(output_dir) ==
                                   os.path.abspath(self.args.output_dir)):
            self.create_model_card(model_name=os.path.basename(os.path.abspath(self.args.output_dir)))

    def _save(self, output_dir: str | None = None, state_dict=None):
        model = unwrap_model(self.model)
        if not _base_config_missing(model):
            return super()._save(output_dir, state_dict)
        # PEFT also saves the embedding layers when the vocabulary was resized, which it finds out by reading
        # config.json at the adapter's base_model_name_or_path. A GGUF base (the embedded model) has none there:
        # PEFT warned at every save and assumed no resize. The trainer knows: neither sstoken nor TRL resizes the
        # vocabulary, and the embedding's size when training began is at hand.
        resized = _embedding_rows(model) != self._vocabulary_at_start
        model.save_pretrained = functools.partial(type(model).save_pretrained, model, save_embedding_layers=resized)
        try:
            super()._save(output_dir, state_dict)
        finally:
            del model.save_pretrained

    def _save_checkpoint(self, model, trial):
        # Our state goes in first: transformers writes trainer_state.json last, so a checkpoint that has it is
        # complete (the CLI resumes only from those), and checkpoint rotation, which runs inside super(),
        # never deletes an older checkpoint before this one holds everything.
        if self.is_world_process_zero():
            self._save_sstoken_state(trial)
        super()._save_checkpoint(model, trial)

    def _save_sstoken_state(self, trial):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        output_dir = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        state = {}
        if self.ema is not None:
            state.update(self.ema.state_dict())
        if state:
            os.makedirs(output_dir, exist_ok=True)
            with atomic_path(os.path.join(output_dir, STATE_FILE)) as tmp:
                save_file(state, str(tmp))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, STATE_FILE)
        if self.ema is None:
            return
        if not os.path.exists(path):
            raise ConfigError(f"checkpoint {resume_from_checkpoint} has no {STATE_FILE}; cannot resume the "
                              f"EMA history exactly")
        self.ema.load_state_dict(load_file(path))


@torch.no_grad()
def _full_logits_token_metrics(logits, labels, response, chunk_size: int):
    """(entropy sum, argmax-hit count, token count) over ``response`` tokens from the model's B×T×V logits."""
    response = response.clone()
    response[:, 0] = False  # nothing predicts the first token
    rows, cols = response.nonzero(as_tuple=True)
    entropy_sum = torch.zeros((), dtype=torch.float32, device=logits.device)
    top1_count = torch.zeros((), dtype=torch.long, device=logits.device)
    for start in range(0, rows.numel(), chunk_size):
        r, c = rows[start:start + chunk_size], cols[start:start + chunk_size]
        chunk = logits[r, c - 1].float()
        entropy, is_top1 = lm_head.logit_stats(chunk, torch.logsumexp(chunk, dim=-1), labels[r, c].to(chunk.device))
        entropy_sum += entropy.sum()
        top1_count += is_top1.sum()
    return entropy_sum, top1_count, torch.tensor(rows.numel(), device=logits.device)


@contextlib.contextmanager
def _trl_sees_no_assistant_only_loss(args):
    """``assistant_only_loss=True`` agrees with sstoken's encoding, but SFTTrainer would act on it: refuse the
    already-encoded dataset as "not conversational" and swap the chat template. It sees None while it is built."""
    value = args.assistant_only_loss
    args.assistant_only_loss = None
    try:
        yield
    finally:
        args.assistant_only_loss = value


def _load_tokenizer(model_path: str, args):
    """The tokenizer SFTTrainer would load for a model path (its revision and trust_remote_code)."""
    from sstoken.models import load_tokenizer, revision_of

    return load_tokenizer(model_path, args.trust_remote_code, revision=revision_of(args.model_init_kwargs))


_CONVERSATION_COLUMNS = ("messages", "prompt", "instruction", "conversations")


def _is_stream(dataset) -> bool:
    from datasets import IterableDataset

    return isinstance(dataset, IterableDataset)


def _columns_of(dataset) -> list[str]:
    """The dataset's column names (none for no dataset); a stream whose features are unknown until read (JSON
    streamed from the Hub) shows those of its first row, so that it is not handed to TRL raw."""
    columns = getattr(dataset, "column_names", None)
    if columns is None and _is_stream(dataset):
        columns = list(next(iter(dataset), None) or {})
    return list(columns or [])


def _has_token_weights(dataset) -> bool:
    """Whether the dataset (or any of a dict of datasets) carries the data's token weights."""
    parts = dataset.values() if isinstance(dataset, dict) else [dataset]
    return any(TOKEN_WEIGHTS in _columns_of(part) for part in parts if part is not None)


def _only_text(columns: list[str]) -> bool:
    return "text" in columns and not any(c in columns for c in _CONVERSATION_COLUMNS)


def _needs_sstoken_encoding(columns: list[str]) -> bool:
    return "input_ids" not in columns and any(c in columns for c in (*_CONVERSATION_COLUMNS, "text"))


def check_text_rows(stats, args, what: str) -> None:
    """Refuse language-modelling ``text`` rows for a selector that ranks tokens by their attention to the
    context: a text row is all response and no context, so its attention share is 0 everywhere and ssToken
    would silently run as REL only. Selectors that read no context (rel, rho1, random, full, tokencleaning)
    train text as TRL does. ``stats`` is the :class:`~sstoken.data.LoadStats` of the encoded data."""
    count = stats.formats.get("text", 0)
    why = _why_text_is_refused(args)
    if count and why:
        raise ConfigError(f"{what}: {count} of {stats.used} rows are plain text {why}")


def _why_text_is_refused(args) -> str | None:
    """The reason plain text rows cannot train with this run's selector, or None when they can."""
    selector = selector_of(args)
    if not selector.needs_attention:
        return None
    return (f"('text': every token is trained, none is context), so the attention share that selection_method "
            f"{selector.name!r} ranks tokens by is 0 there; use selection_method rel or rho1 for text, or give the "
            f"data a prompt (prompt/completion or chat rows)")


def _encode_dataset(dataset, tokenizer, args: SSTokenConfig, label: str, text_refusal: str | None = None):
    """Raw messages / prompt-completion / alpaca / ShareGPT / text rows → input_ids + labels (assistant-only
    for conversations) and their :class:`~sstoken.data.LoadStats`.

    The same cached ``Dataset.map`` encoding as the CLI's (:func:`sstoken.data.sources.encode_dataset`): columns no
    format uses are dropped, and a bad row fails with ``{label}, row i``. ``text_refusal``: why plain text rows
    cannot train; a stream raises it when it reads one (a ``Dataset``'s are counted, see :func:`check_text_rows`).
    """
    from sstoken.data.sources import encode_dataset

    if tokenizer is None:  # a model given as a path has had its tokenizer loaded by __init__
        raise ConfigError("pass processing_class=<tokenizer> with a raw (untokenised) dataset")
    # max_length None means no truncation in TRL, and here too.
    max_length = args.max_length if args.max_length is not None else NO_TRUNCATION
    encoded, stats = encode_dataset(dataset, tokenizer, max_length, label=label, num_proc=args.dataset_num_proc,
                                    stream_text_refusal=text_refusal)
    if stats.skipped_no_trainable_token:
        logger.warning("%s: skipped %d rows with no trainable token (weight 0, or truncated away)", label,
                       stats.skipped_no_trainable_token)
    return encoded, stats
