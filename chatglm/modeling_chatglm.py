"""The one model class transformers' Auto classes see for model_type "chatglm".

Both generations share model_type "chatglm" in their config.json, but they are different networks. The
Auto registry maps one config class to one model class, so this entry class builds (or loads) whichever
of `GLMForConditionalGeneration` / `GLM2ForConditionalGeneration` the config describes.
"""

from __future__ import annotations

from typing import Any

from .configuration_chatglm import ChatGLMConfig
from .loading import model_class_for
from .modeling_utils import ChatGLMPreTrainedModel


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel):
    """`ChatGLMForConditionalGeneration(config)` returns a ChatGLM-6B or ChatGLM2-6B model per `config.version`."""

    def __new__(cls, config: ChatGLMConfig, *args: Any, **kwargs: Any):  # noqa: ANN204
        if cls is ChatGLMForConditionalGeneration:
            # Not an instance of cls, so Python does not call __init__ again on it.
            return model_class_for(config)(config, *args, **kwargs)
        return super().__new__(cls)
