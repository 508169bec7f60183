"""ChatGLM-6B and ChatGLM2-6B as transformers models, with their tokenizers, chat API and quantization.

`import chatglm` registers model_type "chatglm" with transformers' Auto classes, so
`AutoConfig/AutoTokenizer/AutoModel.from_pretrained(folder_or_hub_id)` work without trust_remote_code.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
)

from .configuration_chatglm import ChatGLMConfig
from .engine import ChatEngine, Conversation, default_model_path, load_model
from .generation import InvalidScoreLogitsProcessor, SamplingParams, generate_tokens
from .loading import CheckpointError
from .modeling_chatglm import ChatGLMForConditionalGeneration
from .modeling_glm import GLMForConditionalGeneration
from .modeling_glm2 import GLM2ForConditionalGeneration
from .tokenization_chatglm import ChatGLMTokenizer

__version__ = "0.1.0"


def _register() -> None:
    AutoConfig.register(ChatGLMConfig.model_type, ChatGLMConfig, exist_ok=True)
    AutoTokenizer.register(ChatGLMConfig, slow_tokenizer_class=ChatGLMTokenizer, exist_ok=True)
    for auto_class in (AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM):
        auto_class.register(ChatGLMConfig, ChatGLMForConditionalGeneration, exist_ok=True)


_register()

__all__ = [
    "ChatEngine",
    "ChatGLMConfig",
    "ChatGLMForConditionalGeneration",
    "ChatGLMTokenizer",
    "CheckpointError",
    "Conversation",
    "GLM2ForConditionalGeneration",
    "GLMForConditionalGeneration",
    "InvalidScoreLogitsProcessor",
    "SamplingParams",
    "default_model_path",
    "generate_tokens",
    "load_model",
]
