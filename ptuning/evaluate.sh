#!/usr/bin/env bash
# Predict ADGEN's dev set with a P-tuning checkpoint written by train.sh; writes generated_predictions.txt and
# predict_results.json (ROUGE-1/2/L, BLEU-4) into the checkpoint's ./output/adgen-... folder.
set -euo pipefail
PRE_SEQ_LEN=128
CHECKPOINT=adgen-chatglm2-6b-pt-128-2e-2
STEP=3000
NUM_GPUS=${NUM_GPUS:-1}
MODEL=${MODEL:-THUDM/chatglm2-6b}

torchrun --standalone --nnodes=1 --nproc-per-node=$NUM_GPUS main.py \
    --do_predict \
    --validation_file AdvertiseGen/dev.json \
    --test_file AdvertiseGen/dev.json \
    --overwrite_cache \
    --prompt_column content \
    --response_column summary \
    --model_name_or_path "$MODEL" \
    --ptuning_checkpoint ./output/$CHECKPOINT/checkpoint-$STEP \
    --output_dir ./output/$CHECKPOINT \
    --overwrite_output_dir \
    --max_source_length 64 \
    --max_target_length 64 \
    --per_device_eval_batch_size 1 \
    --predict_with_generate \
    --pre_seq_len $PRE_SEQ_LEN \
    --quantization_bit 4
