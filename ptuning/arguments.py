"""Command-line arguments of ptuning/main.py, with the original script's names and defaults.

Parsed by transformers.HfArgumentParser together with Seq2SeqTrainingArguments, so every standard trainer
option (--output_dir, --per_device_train_batch_size, --deepspeed, --fp16, ...) is available as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ModelArguments:
    """Which model, tokenizer and tuning method to use."""

    model_name_or_path: str = field(
        metadata={"help": "Base model: a hub id (THUDM/chatglm2-6b, THUDM/chatglm-6b) or a local folder."}
    )
    ptuning_checkpoint: Optional[str] = field(
        default=None, metadata={"help": "A P-tuning checkpoint folder whose prefix is loaded onto the base model."}
    )
    config_name: Optional[str] = field(
        default=None, metadata={"help": "Config folder or hub id, if not the model's own."}
    )
    tokenizer_name: Optional[str] = field(
        default=None, metadata={"help": "Tokenizer folder or hub id, if not the model's own."}
    )
    cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Where downloaded models and datasets are cached."}
    )
    use_fast_tokenizer: bool = field(
        default=True, metadata={"help": "Accepted for compatibility; ChatGLM tokenizers have no fast version."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "Hub revision (branch, tag or commit) of the model."}
    )
    use_auth_token: bool = field(
        default=False, metadata={"help": "Use the token stored by `huggingface-cli login` for private models."}
    )
    resize_position_embeddings: Optional[bool] = field(
        default=None, metadata={"help": "Accepted for compatibility; ChatGLM uses rotary positions."}
    )
    quantization_bit: Optional[int] = field(
        default=None, metadata={"help": "Quantize the frozen base model to 4 or 8 bits (P-tuning / LoRA only)."}
    )
    pre_seq_len: Optional[int] = field(
        default=None, metadata={"help": "P-tuning v2 prefix length; unset means full fine-tuning."}
    )
    prefix_projection: bool = field(
        default=False, metadata={"help": "Produce the prefix through a two-layer MLP (P-tuning v2's 'reparameterization')."}
    )
    # LoRA (an addition to the original script; uses peft).
    lora_rank: Optional[int] = field(
        default=None, metadata={"help": "Train a LoRA adapter of this rank on query_key_value instead (peft)."}
    )
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scaling numerator (update scaled by alpha/rank)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA branch input."})
    lora_checkpoint: Optional[str] = field(
        default=None, metadata={"help": "A LoRA adapter folder (written by --lora_rank) to evaluate or continue."}
    )


@dataclass
class DataTrainingArguments:
    """Which data to train and evaluate on, and how it is turned into model inputs."""

    lang: Optional[str] = field(default=None, metadata={"help": "Language id (kept for compatibility; unused)."})
    dataset_name: Optional[str] = field(
        default=None, metadata={"help": "A dataset on the hub (instead of local files)."}
    )
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    prompt_column: Optional[str] = field(
        default=None, metadata={"help": "Column holding the input text (e.g. ADGEN's `content`, chat data's `prompt`)."}
    )
    response_column: Optional[str] = field(
        default=None, metadata={"help": "Column holding the target text (e.g. `summary`, `response`)."}
    )
    history_column: Optional[str] = field(
        default=None, metadata={"help": "Column holding earlier turns as a list of [query, response] pairs."}
    )
    train_file: Optional[str] = field(default=None, metadata={"help": "Training data, JSON lines (.json/.jsonl)."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Evaluation data, same format."})
    test_file: Optional[str] = field(default=None, metadata={"help": "Prediction data, same format."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Re-run preprocessing instead of using the cache."})
    preprocessing_num_workers: Optional[int] = field(
        default=None, metadata={"help": "Processes used for tokenisation."}
    )
    max_source_length: Optional[int] = field(
        default=1024, metadata={"help": "Prompt tokens kept (longer prompts are truncated)."}
    )
    max_target_length: Optional[int] = field(
        default=128, metadata={"help": "Response tokens kept for training (longer responses are truncated)."}
    )
    val_max_target_length: Optional[int] = field(
        default=None, metadata={"help": "Response tokens kept for evaluation labels (default: max_target_length)."}
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={"help": "Pad every training example to max_source_length + max_target_length (+1) tokens, as the "
                  "original always did; by default batches are padded only to their longest example (same loss, "
                  "less compute)."},
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Use only the first N evaluation rows."})
    max_predict_samples: Optional[int] = field(default=None, metadata={"help": "Use only the first N test rows."})
    num_beams: Optional[int] = field(default=None, metadata={"help": "Beam count for evaluation/prediction."})
    ignore_pad_token_for_loss: bool = field(
        default=True, metadata={"help": "Label padding (and the prompt) is -100, i.e. left out of the loss."}
    )
    source_prefix: Optional[str] = field(default="", metadata={"help": "Text put in front of every prompt."})
    forced_bos_token: Optional[str] = field(
        default=None, metadata={"help": "Kept for compatibility (a multilingual-model option; unused)."}
    )
    history_loss: bool = field(
        default=False,
        metadata={"help": "ChatGLM2 only (an addition to the original): a row with history trains every answer of "
                  "its conversation, not just the last one."},
    )
    # Generation settings for --do_eval / --do_predict with --predict_with_generate; the defaults are the
    # values the original script hard-coded.
    do_sample: bool = field(default=True, metadata={"help": "Sample when generating (False: greedy or beams)."})
    top_p: float = field(default=0.7, metadata={"help": "Nucleus sampling mass when generating."})
    temperature: float = field(default=0.95, metadata={"help": "Sampling temperature when generating."})

    def __post_init__(self) -> None:
        if self.dataset_name is None and not (self.train_file or self.validation_file or self.test_file):
            raise ValueError("give --train_file, --validation_file or --test_file (JSON lines), or --dataset_name")
        for name in ("train_file", "validation_file", "test_file"):
            path = getattr(self, name)
            if path is not None and path.rsplit(".", 1)[-1] not in ("json", "jsonl"):
                raise ValueError(f"--{name} must be a .json or .jsonl file of JSON lines, got {path}")
        if self.val_max_target_length is None:
            self.val_max_target_length = self.max_target_length


@dataclass
class ExtraTrainingArguments:
    """Trainer options outside Seq2SeqTrainingArguments: one the original scripts pass that current transformers
    removed (accepted and ignored), and a way to turn off the gradient checkpointing the original always used."""

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Ignored: transformers >= 5 always writes into --output_dir."}
    )
    no_gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Keep activations instead of recomputing them in backward: faster, but needs memory "
                  "for all of them (fine for small models; the 6B models need checkpointing)."},
    )
