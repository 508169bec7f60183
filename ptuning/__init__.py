"""P-tuning v2, full fine-tuning and LoRA for ChatGLM-6B / ChatGLM2-6B (`python ptuning/main.py --help`).

The modules import nothing heavy at package import time, so `ptuning.data` and `ptuning.metrics` can be
used on their own.
"""
