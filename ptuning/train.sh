#!/usr/bin/env bash
# P-tuning v2 of ChatGLM2-6B on ADGEN (content -> summary), int4 base, only the 128-token prefix is trained.
# Run from this folder with AdvertiseGen/train.json and dev.json unpacked here. Set NUM_GPUS for more GPUs.
set -euo pipefail
PRE_SEQ_LEN=128
LR=2e-2
NUM_GPUS=${NUM_GPUS:-1}
MODEL=${MODEL:-THUDM/chatglm2-6b}

torchrun --standalone --nnodes=1 --nproc-per-node=$NUM_GPUS main.py \
    --do_train \
    --train_file AdvertiseGen/train.json \
    --validation_file AdvertiseGen/dev.json \
    --preprocessing_num_workers 10 \
    --prompt_column content \
    --response_column summary \
    --overwrite_cache \
    --model_name_or_path "$MODEL" \
    --output_dir output/adgen-chatglm2-6b-pt-$PRE_SEQ_LEN-$LR \
    --overwrite_output_dir \
    --max_source_length 64 \
    --max_target_length 128 \
    --per_device_train_batch_size 1 \
    --per_device_eval_batch_size 1 \
    --gradient_accumulation_steps 16 \
    --predict_with_generate \
    --max_steps 3000 \
    --logging_steps 10 \
    --save_steps 1000 \
    --learning_rate $LR \
    --pre_seq_len $PRE_SEQ_LEN \
    --quantization_bit 4
