#!/usr/bin/env python
"""Fine-tune ChatGLM2-6B / ChatGLM-6B with P-tuning v2, LoRA or all weights, evaluate and predict.

Arguments are those of the original ptuning/main.py (see ptuning/arguments.py) plus every
transformers.Seq2SeqTrainingArguments option; a single .json file holding them all also works.

    # P-tuning v2 on ADGEN (see train.sh), then predict with the checkpoint (evaluate.sh)
    torchrun --standalone --nnodes=1 --nproc-per-node=1 main.py --do_train --train_file AdvertiseGen/train.json \
        --prompt_column content --response_column summary --model_name_or_path THUDM/chatglm2-6b \
        --output_dir output/adgen-chatglm2-6b-pt-128-2e-2 --pre_seq_len 128 --learning_rate 2e-2 ...
    python main.py --do_predict --test_file AdvertiseGen/dev.json --predict_with_generate \
        --prompt_column content --response_column summary --model_name_or_path THUDM/chatglm2-6b \
        --ptuning_checkpoint output/adgen-chatglm2-6b-pt-128-2e-2/checkpoint-3000 --pre_seq_len 128 ...

Without --pre_seq_len (and --lora_rank) all weights are trained in fp32, optionally under DeepSpeed
(`--deepspeed deepspeed.json`, see ds_train_finetune.sh).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script (python ptuning/main.py, torchrun main.py): make the repository importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import HfArgumentParser, Seq2SeqTrainingArguments, set_seed  # noqa: E402

from ptuning.arguments import DataTrainingArguments, ExtraTrainingArguments, ModelArguments  # noqa: E402
from ptuning.data import IGNORE_INDEX, Seq2SeqCollator, preprocess_eval, preprocess_train  # noqa: E402
from ptuning.metrics import decode_ids, make_compute_metrics  # noqa: E402
from ptuning.trainer import PrefixTrainer  # noqa: E402

logger = logging.getLogger("ptuning")

PREDICTIONS_FILE = "generated_predictions.txt"


def parse_arguments(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataTrainingArguments, Seq2SeqTrainingArguments, ExtraTrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, Seq2SeqTrainingArguments, ExtraTrainingArguments))
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        parsed = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    else:
        parsed = parser.parse_args_into_dataclasses(args=argv)
    return tuple(parsed)


def _half_dtype(training_args: Seq2SeqTrainingArguments) -> torch.dtype:
    # The frozen base of P-tuning/LoRA runs in half precision as in the original (model.half()); CPUs get bf16,
    # which they compute natively and which cannot overflow the way fp16 does.
    if training_args.bf16 or not torch.cuda.is_available():
        return torch.bfloat16
    return torch.float16


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Gradient (activation) checkpointing plus trainable input embeddings' outputs, as the original trains."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5 (also makes the input embeddings' output require grad)
        enable()
    else:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()


def load_model_and_tokenizer(
    model_args: ModelArguments, training_args: Seq2SeqTrainingArguments, checkpointing: bool = True
) -> tuple[torch.nn.Module, Any]:
    """The model set up for the chosen method (prefix encoder / LoRA / full), and its tokenizer."""
    from chatglm import ChatGLMConfig, ChatGLMTokenizer
    from chatglm.loading import load_pretrained, resolve_model_dir
    from chatglm.ptuning import enable_prefix_tuning, load_prefix_encoder, read_prefix_settings

    hub = {"revision": model_args.model_revision, "cache_dir": model_args.cache_dir,
           "token": True if model_args.use_auth_token else None}
    folder = resolve_model_dir(model_args.model_name_or_path, **hub)
    tokenizer_dir = resolve_model_dir(model_args.tokenizer_name, **hub) if model_args.tokenizer_name else folder
    tokenizer = ChatGLMTokenizer.from_pretrained(str(tokenizer_dir))
    config = None
    if model_args.config_name:
        config = ChatGLMConfig.from_pretrained(str(resolve_model_dir(model_args.config_name, **hub)))

    pre_seq_len, prefix_projection = model_args.pre_seq_len, model_args.prefix_projection
    if model_args.ptuning_checkpoint and pre_seq_len is None:
        pre_seq_len, prefix_projection = read_prefix_settings(model_args.ptuning_checkpoint)
        model_args.pre_seq_len, model_args.prefix_projection = pre_seq_len, prefix_projection
    parameter_efficient = pre_seq_len is not None or model_args.lora_rank or model_args.lora_checkpoint
    if model_args.quantization_bit and not parameter_efficient and training_args.do_train:
        raise ValueError("--quantization_bit needs --pre_seq_len or --lora_rank: int4/int8 weights cannot be trained")
    dtype = _half_dtype(training_args) if parameter_efficient else torch.float32
    model = load_pretrained(folder, config=config, dtype=dtype, quantize=model_args.quantization_bit)

    if pre_seq_len is not None:
        enable_prefix_tuning(model, pre_seq_len, prefix_projection)
        if model_args.ptuning_checkpoint:
            load_prefix_encoder(model, model_args.ptuning_checkpoint)
    if model_args.lora_rank or model_args.lora_checkpoint:
        model = _apply_lora(model, model_args, training_args, checkpointing)
    return model, tokenizer


def _apply_lora(
    model: torch.nn.Module, model_args: ModelArguments, training_args: Seq2SeqTrainingArguments, checkpointing: bool
) -> Any:
    from peft import LoraConfig, PeftModel, get_peft_model

    if training_args.do_train and checkpointing:
        # Gradient checkpointing has to be switched on in the base model before peft wraps it.
        enable_checkpointing(model)
    if model_args.lora_checkpoint:
        return PeftModel.from_pretrained(model, model_args.lora_checkpoint, is_trainable=training_args.do_train)
    config = LoraConfig(
        r=model_args.lora_rank, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
        target_modules=["query_key_value"], task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments) -> Any:
    import datasets

    if data_args.dataset_name:
        return datasets.load_dataset(
            data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir,
            token=True if model_args.use_auth_token else None,
        )
    files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
    files = {split: path for split, path in files.items() if path}
    return datasets.load_dataset("json", data_files=files, cache_dir=model_args.cache_dir)


def _prepare_split(
    raw: Any, split: str, limit: int | None, function: Any, tokenizer: Any, data_args: DataTrainingArguments,
    version: int, training_args: Seq2SeqTrainingArguments,
) -> Any:
    if split not in raw:
        raise ValueError(f"this run needs a {split} split: pass --{'test' if split == 'test' else split}_file")
    dataset = raw[split]
    for column in (data_args.prompt_column, data_args.response_column, data_args.history_column):
        if column is not None and column not in dataset.column_names:
            raise ValueError(f"the {split} data has no column {column!r} (columns: {dataset.column_names})")
    if limit is not None:
        dataset = dataset.select(range(min(len(dataset), limit)))
    with training_args.main_process_first(desc=f"{split} dataset tokenisation"):
        return dataset.map(
            function,
            batched=True,
            num_proc=data_args.preprocessing_num_workers,
            remove_columns=dataset.column_names,
            load_from_cache_file=not data_args.overwrite_cache,
            fn_kwargs={"tokenizer": tokenizer, "data_args": data_args, "version": version},
            desc=f"Tokenising the {split} data",
        )


def _log_example(dataset: Any, tokenizer: Any) -> None:
    example = dataset[0]
    logger.info("first training example: input %r", tokenizer.decode(example["input_ids"]))
    labels = [t for t in example["labels"] if t != IGNORE_INDEX]
    logger.info("first training example: labels %r", tokenizer.decode(labels))


def generation_kwargs(data_args: DataTrainingArguments) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"max_new_tokens": data_args.val_max_target_length, "do_sample": data_args.do_sample}
    if data_args.do_sample:
        kwargs.update(top_p=data_args.top_p, temperature=data_args.temperature)
    if data_args.num_beams:
        kwargs["num_beams"] = data_args.num_beams
    return kwargs


def run(
    model_args: ModelArguments,
    data_args: DataTrainingArguments,
    training_args: Seq2SeqTrainingArguments,
    extra_args: ExtraTrainingArguments | None = None,
) -> dict[str, float]:
    """Train / evaluate / predict as the arguments ask; returns every metric logged."""
    checkpointing = not (extra_args is not None and extra_args.no_gradient_checkpointing)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info("training/evaluation parameters %s", training_args)
    if (data_args.prompt_column is None) or (data_args.response_column is None):
        raise ValueError("--prompt_column and --response_column are required (e.g. content/summary for ADGEN)")
    if (training_args.do_eval or training_args.do_predict) and not training_args.predict_with_generate:
        # Evaluation here means generating answers and scoring them; the loss of prompt-free labels means nothing.
        logger.warning("--do_eval/--do_predict generate answers: turning on --predict_with_generate")
        training_args.predict_with_generate = True

    set_seed(training_args.seed)
    model, tokenizer = load_model_and_tokenizer(model_args, training_args, checkpointing)
    version = model.config.version
    raw = load_raw_datasets(data_args, model_args)

    train_dataset = eval_dataset = predict_dataset = None
    if training_args.do_train:
        train_dataset = _prepare_split(raw, "train", data_args.max_train_samples, preprocess_train, tokenizer,
                                       data_args, version, training_args)
        _log_example(train_dataset, tokenizer)
    if training_args.do_eval:
        eval_dataset = _prepare_split(raw, "validation", data_args.max_eval_samples, preprocess_eval, tokenizer,
                                      data_args, version, training_args)
    if training_args.do_predict:
        predict_dataset = _prepare_split(raw, "test", data_args.max_predict_samples, preprocess_eval, tokenizer,
                                         data_args, version, training_args)

    label_pad = IGNORE_INDEX if data_args.ignore_pad_token_for_loss else tokenizer.pad_token_id
    if training_args.do_train and checkpointing and not (model_args.lora_rank or model_args.lora_checkpoint):
        enable_checkpointing(model)
    trainer = PrefixTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=Seq2SeqCollator(tokenizer.pad_token_id, label_pad),
        compute_metrics=make_compute_metrics(tokenizer) if training_args.predict_with_generate else None,
        save_changed=model_args.pre_seq_len is not None,
    )

    results: dict[str, float] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        metrics = dict(train_result.metrics, train_samples=len(train_dataset))
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results.update(metrics)

    gen = generation_kwargs(data_args)
    if training_args.do_eval:
        metrics = trainer.evaluate(metric_key_prefix="eval", **gen)
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)

    if training_args.do_predict:
        prediction = trainer.predict(predict_dataset, metric_key_prefix="predict", **gen)
        metrics = dict(prediction.metrics, predict_samples=len(predict_dataset))
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
        results.update(metrics)
        if trainer.is_world_process_zero():
            predictions = decode_ids(tokenizer, prediction.predictions)
            labels = decode_ids(tokenizer, prediction.label_ids)
            os.makedirs(training_args.output_dir, exist_ok=True)
            path = os.path.join(training_args.output_dir, PREDICTIONS_FILE)
            with open(path, "w", encoding="utf-8") as handle:
                for label, predict in zip(labels, predictions):
                    handle.write(json.dumps({"labels": label, "predict": predict}, ensure_ascii=False) + "\n")
            logger.info("wrote %d predictions to %s", len(predictions), path)
    return results


def main(argv: list[str] | None = None) -> dict[str, float]:
    return run(*parse_arguments(argv))


if __name__ == "__main__":
    main()
