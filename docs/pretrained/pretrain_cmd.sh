#!/usr/bin/env bash
# The exact stage-1 command behind docs/pretrained/stage1_codebook, from which docs/pretrained/compute_codebook.py computes
# the shipped src/peft_personamux/pretrained/shakespeare (see docs/pretrained_codebook.md).
# Resumable: re-run with --resume_from_checkpoint true after an interruption.
set -euo pipefail
personamux pretrain \
  --output_dir runs/shakespeare-pretrain \
  --dataset shakespeare --min_lines 40 --pretrain_fraction 0.75 --split_seed 0 \
  --max_examples_per_persona 48 --max_chars 120 \
  --max_prompt_tokens 48 --max_response_tokens 48 \
  --num_codes 64 --tokens_per_code 8 --num_bias_tokens 12 \
  --per_device_train_batch_size 8 --learning_rate 1e-2 \
  --mixture_learning_rate 0.1 --personas_per_batch 2 --length_grouped true \
  --identity_every 250 --identity_lines 2 --identity_personas 64 \
  --max_steps "${MAX_STEPS:-2000}" --warmup_epochs 0.08 \
  --logging_steps 10 --save_strategy steps --save_steps 250 --save_total_limit 2 \
  --seed 0 --report_to none --disable_tqdm true "$@"
