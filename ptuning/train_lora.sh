#!/usr/bin/env bash
# LoRA (rank 8, peft) on query_key_value of ChatGLM2-6B on ADGEN: an extra next to P-tuning v2.
set -euo pipefail
LR=2e-4
NUM_GPUS=${NUM_GPUS:-1}
MODEL=${MODEL:-THUDM/chatglm2-6b}

torchrun --standalone --nnodes=1 --nproc-per-node=$NUM_GPUS main.py \
    --do_train \
    --train_file AdvertiseGen/train.json \
    --prompt_column content \
    --response_column summary \
    --overwrite_cache \
    --model_name_or_path "$MODEL" \
    --output_dir output/adgen-chatglm2-6b-lora-8-$LR \
    --max_source_length 64 \
    --max_target_length 128 \
    --per_device_train_batch_size 1 \
    --gradient_accumulation_steps 16 \
    --max_steps 3000 \
    --logging_steps 10 \
    --save_steps 1000 \
    --learning_rate $LR \
    --lora_rank 8
