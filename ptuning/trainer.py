"""The transformers Seq2SeqTrainer, adapted to a decoder-only model and to prefix-only checkpoints.

Differences from the stock trainer:
  * with `save_changed` (P-tuning) a checkpoint holds only the trainable parameters, i.e. the prefix encoder
    (a few MB instead of 12 GB), and resuming loads them back the same way;
  * generation-based evaluation returns only the generated continuation (the stock trainer assumes an
    encoder-decoder, whose outputs do not repeat the prompt), and computes no loss, because evaluation labels
    hold only the response and cannot be aligned with the prompt;
  * training always runs without a KV cache: gradient checkpointing re-runs every layer in backward, and a
    cache would be appended to twice.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn
from transformers import Seq2SeqTrainer
from transformers.trainer import TRAINING_ARGS_NAME

logger = logging.getLogger(__name__)


class PrefixTrainer(Seq2SeqTrainer):
    """Seq2SeqTrainer for ChatGLM: prefix-only checkpoints when `save_changed`, decoder-only generation."""

    def __init__(self, *args: Any, save_changed: bool = False, **kwargs: Any) -> None:
        self.save_changed = save_changed
        super().__init__(*args, **kwargs)

    # -- training ---------------------------------------------------------------------------------------------

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        return super().compute_loss(model, {**inputs, "use_cache": False}, *args, **kwargs)

    # -- saving and resuming ------------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.save_changed:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        changed = {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}
        logger.info("saving %d trainable tensors (the prefix encoder) to %s", len(changed), output_dir)
        model.save_pretrained(output_dir, state_dict=changed)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not self.save_changed:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from chatglm.ptuning import load_prefix_encoder

        load_prefix_encoder(self.accelerator.unwrap_model(model if model is not None else self.model),
                            resume_from_checkpoint)

    # -- generation-based evaluation ----------------------------------------------------------------------------

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
        **gen_kwargs: Any,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        if not self.args.predict_with_generate or prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        if not gen_kwargs and hasattr(self, "_gen_kwargs"):
            gen_kwargs = self._gen_kwargs.copy()
        gen_kwargs = {k: v for k, v in gen_kwargs.items() if v is not None}
        input_ids = inputs["input_ids"]
        with torch.no_grad():
            generated = self.accelerator.unwrap_model(model).generate(
                input_ids=input_ids, attention_mask=inputs.get("attention_mask"), **gen_kwargs
            )
        # The model continues the (left-padded) prompt; keep what it added.
        generated = generated[:, input_ids.shape[1]:]
        return None, generated, inputs.get("labels")
