#!/usr/bin/env bash
# Chat in the browser with a P-tuning checkpoint (any script taking the shared model options works the same way,
# e.g. ../cli_demo.py, ../api.py).
set -euo pipefail
PRE_SEQ_LEN=128
MODEL=${MODEL:-THUDM/chatglm2-6b}

python ../web_demo.py \
    --model "$MODEL" \
    --ptuning_checkpoint output/adgen-chatglm2-6b-pt-128-2e-2/checkpoint-3000 \
    --pre_seq_len $PRE_SEQ_LEN
