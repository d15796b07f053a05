"""Train and score Base, ICL, LoRA, soft prompts and Persona-Mux on one split (paper Tables 2 and 4-7).

    python examples/evaluate.py --quick                              # tiny random models, a few minutes
    python examples/evaluate.py --config configs/eval_full.json      # SmolLM2-135M + Shakespeare, < 2 h on 2 cores
    python examples/evaluate.py --config configs/eval_full.json --num_unseen_personas 6 --output_dir eval_small

Same as ``personamux evaluate``. Every field of `EvalConfig` is also a flag (``--help`` lists them); an interrupted
run continues from the stages it finished (``<output_dir>/stages``). See docs/evaluation.md.
"""

from __future__ import annotations

import sys

from peft_personamux.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
