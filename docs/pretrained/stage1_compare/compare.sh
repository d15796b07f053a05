#!/usr/bin/env bash
# Stage-1 variants at small scale, same data subset and the same example-pass budget each (docs/results.md,
# "Stage 1 variants"): 64 pretraining personas x 24 lines, 960 example passes per variant, the persona-identity
# diagnostic every 40 steps on 2 held-out lines of 32 personas. Outputs go to runs/stage1_compare/<variant>.
set -euo pipefail
common=(
  --dataset shakespeare --min_lines 40 --max_chars 120 --pretrain_fraction 0.75 --split_seed 0
  --max_personas 64 --max_examples_per_persona 24
  --max_prompt_tokens 48 --max_response_tokens 48
  --num_codes 64 --tokens_per_code 8 --num_bias_tokens 12
  --per_device_train_batch_size 8 --learning_rate 1e-2 --warmup_epochs 0.163
  --identity_every 40 --identity_lines 2 --identity_personas 32
  --logging_steps 10 --save_strategy no --seed 0 --report_to none --disable_tqdm true
)
out=${1:-runs/stage1_compare}
# paper: one learning rate, random batches, noise codebook
personamux pretrain --output_dir "$out/paper" "${common[@]}" --max_steps 120
# + the mixture table at 10x the learning rate, 2 personas x 4 lines per batch, length-grouped
personamux pretrain --output_dir "$out/grouped_lr" "${common[@]}" --max_steps 120 \
  --mixture_learning_rate 0.1 --personas_per_batch 2 --length_grouped true
# + the gradient codebook start (4 lines x 64 personas = 256 passes = 32 steps, taken off its budget)
personamux pretrain --output_dir "$out/grouped_lr_gradient" "${common[@]}" --max_steps 88 \
  --mixture_learning_rate 0.1 --personas_per_batch 2 --length_grouped true \
  --gradient_codebook true --gradient_codebook_lines 4
