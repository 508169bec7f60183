#!/usr/bin/env bash
# Predict ADGEN's dev set with a fully fine-tuned checkpoint written by ds_train_finetune.sh.
set -euo pipefail
CHECKPOINT=adgen-chatglm2-6b-ft-1e-4
STEP=5000
NUM_GPUS=${NUM_GPUS:-1}

torchrun --standalone --nnodes=1 --nproc-per-node=$NUM_GPUS main.py \
    --do_predict \
    --validation_file AdvertiseGen/dev.json \
    --test_file AdvertiseGen/dev.json \
    --overwrite_cache \
    --prompt_column content \
    --response_column summary \
    --model_name_or_path ./output/$CHECKPOINT/checkpoint-$STEP \
    --output_dir ./output/$CHECKPOINT \
    --overwrite_output_dir \
    --max_source_length 256 \
    --max_target_length 256 \
    --per_device_eval_batch_size 1 \
    --predict_with_generate \
    --fp16_full_eval
