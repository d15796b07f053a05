#!/usr/bin/env bash
# The exact command that produced src/peft_personamux/pretrained/shakespeare (see docs/pretrained_codebook.md).
set -euo pipefail
personamux pretrain \
  --output_dir runs/shakespeare-pretrain \
  --dataset shakespeare --min_lines 40 --pretrain_fraction 0.9 --split_seed 0 \
  --max_personas 64 --max_examples_per_persona 6 --max_chars 120 \
  --max_prompt_tokens 48 --max_response_tokens 40 \
  --num_codes 64 --tokens_per_code 8 --num_bias_tokens 12 \
  --num_train_epochs 2 --warmup_epochs 0.5 --per_device_train_batch_size 8 --learning_rate 1e-2 \
  --logging_steps 4 --save_strategy steps --save_steps 16 --save_total_limit 2 \
  --seed 0 --report_to none "$@"
