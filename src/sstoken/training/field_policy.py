"""What sstoken does with each field of TRL's ``SFTConfig`` (and the ``TrainingArguments`` it extends).

sstoken computes its own loss (``SSTokenTrainer.compute_loss``) and encodes raw rows itself, so a TRL setting that
acts inside TRL's loss or TRL's tokenisation would be silently ignored unless sstoken honours it too. This table is
the single source of truth: ``tests/training/test_field_policy.py`` fails when a TRL or transformers upgrade adds a field
that is not in it, and ``docs/config.md`` is generated from it (:func:`policy_markdown`).

Each field is one of:

* ``trl``: TRL's SFTTrainer or transformers' Trainer applies it exactly as under ``trl sft`` (sstoken does not
  change the training loop, the collator, the optimizer, logging or saving);
* ``sstoken``: sstoken reimplements it on its own path (its loss, its encoding, its CLI);
* ``refused``: values that cannot work with token selection are refused with a one-line ``ConfigError`` when the
  config is built (``SSTokenConfig.__post_init__``), before any model loads; the note says which values.
"""

from __future__ import annotations

from dataclasses import dataclass

TRL, SSTOKEN, REFUSED = "trl", "sstoken", "refused"


@dataclass(frozen=True)
class FieldPolicy:
    handling: str  # TRL, SSTOKEN or REFUSED
    note: str


_LOOP = "transformers' Trainer (training loop, optimizer, schedule, logging, saving, hub); unchanged by sstoken"

# TrainingArguments fields that only the Trainer reads: sstoken changes nothing about them.
_TRAINER_FIELDS = (
    "output_dir per_device_train_batch_size num_train_epochs max_steps lr_scheduler_type lr_scheduler_kwargs "
    "warmup_steps optim optim_args weight_decay adam_beta1 adam_beta2 adam_epsilon optim_target_modules "
    "gradient_accumulation_steps max_grad_norm fp16 bf16_full_eval fp16_full_eval tf32 activation_checkpointing_kwargs "
    "gradient_checkpointing_kwargs torch_compile_backend torch_compile_mode torch_empty_cache_steps "
    "auto_find_batch_size logging_strategy logging_steps logging_first_step log_on_each_node logging_nan_inf_filter "
    "include_num_input_tokens_seen log_level log_level_replica disable_tqdm run_name project trackio_space_id "
    "trackio_bucket_id trackio_static_space_id eval_strategy eval_steps eval_delay per_device_eval_batch_size "
    "eval_on_start eval_do_concat_batches eval_use_gather_object eval_accumulation_steps include_for_metrics "
    "batch_eval_metrics save_only_model save_strategy save_steps save_on_each_node save_total_limit "
    "enable_jit_checkpoint push_to_hub hub_token hub_private_repo hub_model_id hub_strategy hub_always_push "
    "hub_revision load_best_model_at_end metric_for_best_model greater_is_better ignore_data_skip "
    "restore_callback_states_from_checkpoint full_determinism seed data_seed accelerator_config parallelism_config "
    "dataloader_drop_last dataloader_num_workers dataloader_persistent_workers dataloader_prefetch_factor "
    "dataloader_multiprocessing_context dataloader_in_order remove_unused_columns train_sampling_strategy "
    "length_column_name ddp_find_unused_parameters ddp_bucket_cap_mb ddp_broadcast_buffers ddp_static_graph "
    "ddp_backend ddp_timeout fsdp fsdp_config deepspeed debug skip_memory_metrics do_train do_eval do_predict "
    "local_rank"
).split()

SFT_FIELD_POLICY: dict[str, FieldPolicy] = {name: FieldPolicy(TRL, _LOOP) for name in _TRAINER_FIELDS}
SFT_FIELD_POLICY.update({
    # ---- TrainingArguments fields that sstoken touches
    "learning_rate": FieldPolicy(TRL, "TRL's default (2e-5) and meaning"),
    "bf16": FieldPolicy(TRL, "TRL's default (on), except on machines without bf16 support, where it is off "
                             "instead of failing"),
    "use_cpu": FieldPolicy(TRL, "as in transformers; also turns dataloader_pin_memory off"),
    "dataloader_pin_memory": FieldPolicy(TRL, "as in transformers; off by default on CPU-only runs, where it only "
                                              "makes torch warn"),
    "activation_checkpointing": FieldPolicy(TRL, "TRL's default (on) under transformers 5's name"),
    "gradient_checkpointing": FieldPolicy(TRL, "deprecated alias of activation_checkpointing; either name works"),
    "resume_from_checkpoint": FieldPolicy(SSTOKEN, "the CLI resumes from it (true: the newest complete "
                                                   "checkpoint); sstoken's EMA history state is restored too"),
    "report_to": FieldPolicy(TRL, "as in transformers; names are checked before the model loads"),
    "use_cache": FieldPolicy(TRL, "as in transformers; sstoken's training forwards always run without a KV cache"),
    "torch_compile": FieldPolicy(TRL, "as in transformers; dynamo traces sstoken's forward, probe and head with "
                                      "graph breaks around the selection (the same run as without it)"),
    "neftune_noise_alpha": FieldPolicy(TRL, "as in transformers (noise on the input embeddings); the no-grad "
                                            "history pass sees the noise too"),
    "prediction_loss_only": FieldPolicy(TRL, "as in TRL: logits for compute_metrics come from one more no-grad "
                                             "forward, since sstoken's head never builds them"),
    "average_tokens_across_devices": FieldPolicy(SSTOKEN, "sstoken's loss divides by the kept tokens of the whole "
                                                          "step, summed over ranks when on (the default)"),
    "label_smoothing_factor": FieldPolicy(SSTOKEN, "applied to the kept tokens' cross-entropy, computed from the "
                                                   "full logits (sstoken's head is bypassed; slower)"),
    "label_names": FieldPolicy(REFUSED, "sstoken reads the `labels` column; any other value is refused"),
    "use_liger_kernel": FieldPolicy(REFUSED, "as in TRL: Liger's layer kernels (RMSNorm, RoPE, SwiGLU, ...) are "
                                             "applied when training starts, under sstoken's own LM head (TRL "
                                             "deprecates it for model_init_kwargs use_kernels); true is refused "
                                             "without a GPU or without liger-kernel >= 0.8.2"),
    "liger_kernel_config": FieldPolicy(REFUSED, "Liger's options, as in TRL; fused_linear_cross_entropy true is "
                                                "refused (it hides the per-token NLL that selection ranks), and so "
                                                "is any value without use_liger_kernel"),
    # ---- SFTConfig's own fields
    "model_init_kwargs": FieldPolicy(SSTOKEN, "used for from_pretrained when the model is a path (API: by TRL; "
                                              "CLI: by sstoken's loader); refused with an already-built model"),
    "trust_remote_code": FieldPolicy(SSTOKEN, "as in TRL; in a recipe it is the run key of the same name"),
    "router_aux_loss_coef": FieldPolicy(SSTOKEN, "MoE load-balancing loss added to sstoken's loss as TRL does "
                                                 "(weight: this value, else the model config's); logged as aux_loss"),
    "chat_template_path": FieldPolicy(SSTOKEN, "a .jinja/.j2 file, set on the tokenizer before the data is "
                                               "encoded; cloning a template from another tokenizer is refused"),
    "eos_token": FieldPolicy(SSTOKEN, "set on the tokenizer before the data is encoded (and on the model config "
                                      "by TRL); a token missing from the vocabulary is refused"),
    "dataset_text_field": FieldPolicy(REFUSED, "sstoken reads language-modelling rows from a 'text' column "
                                               "only (rename the column); only the default ('text') is accepted"),
    "dataset_kwargs": FieldPolicy(TRL, "as in TRL (skip_prepare_dataset skips truncation and packing of encoded "
                                       "rows)"),
    "dataset_num_proc": FieldPolicy(TRL, "processes of TRL's map steps (truncation, packing) and of sstoken's own "
                                         "encoding of raw rows"),
    "max_length": FieldPolicy(SSTOKEN, "sstoken's encoding truncates to it (keeping the start; None: no "
                                       "truncation, as in TRL); the CLI's max_seq_length is the same setting"),
    "truncation_mode": FieldPolicy(REFUSED, "only 'keep_start' (sstoken's encoding keeps the start); 'keep_end' "
                                            "is refused (deprecated in TRL too)"),
    "shuffle_dataset": FieldPolicy(TRL, "as in TRL"),
    "packing": FieldPolicy(TRL, "as in TRL; selectors that need per-sample caches refuse it"),
    "packing_strategy": FieldPolicy(TRL, "as in TRL"),
    "padding_free": FieldPolicy(TRL, "as in TRL, including its refusal without packing while max_length is set "
                                     "(made before the model loads)"),
    "pad_to_multiple_of": FieldPolicy(TRL, "as in TRL (collator)"),
    "eval_packing": FieldPolicy(TRL, "as in TRL"),
    "completion_only_loss": FieldPolicy(REFUSED, "sstoken always trains on response tokens only: None and true "
                                                 "agree, false is refused"),
    "assistant_only_loss": FieldPolicy(REFUSED, "sstoken always trains on assistant turns only: unset (None, "
                                                "sstoken's default) and true agree, false is refused"),
    "loss_type": FieldPolicy(SSTOKEN, "'nll' (or its alias 'chunked_nll'), or 'dft': each kept token's NLL "
                                      "weighted by its detached probability, divided by the kept count, as TRL "
                                      "does, with any selection_method; evaluation stays the plain response NLL; "
                                      "with label_smoothing_factor refused"),
    "activation_offloading": FieldPolicy(TRL, "as in TRL (its training_step context); not yet tested with sstoken "
                                              "on a GPU"),
    "pad_token": FieldPolicy(TRL, "as in TRL (deprecated there); the collator's pad token"),
})

HANDLING_WORDS = {TRL: "as in TRL", SSTOKEN: "sstoken", REFUSED: "some values refused"}


def policy_markdown() -> str:
    """The table of ``docs/config.md``: one row per field, sorted, Trainer-only fields grouped in one row."""
    lines = ["| field | handled by | notes |", "|---|---|---|"]
    for name in sorted(SFT_FIELD_POLICY):
        policy = SFT_FIELD_POLICY[name]
        if name in _TRAINER_FIELDS and policy.note == _LOOP:
            continue
        lines.append(f"| `{name}` | {HANDLING_WORDS[policy.handling]} | {policy.note} |")
    trainer_only = sorted(n for n in _TRAINER_FIELDS if SFT_FIELD_POLICY[n].note == _LOOP)
    lines.append(f"| {', '.join(f'`{n}`' for n in trainer_only)} | as in TRL | {_LOOP} |")
    return "\n".join(lines) + "\n"
