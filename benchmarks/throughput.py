"""Generation throughput with a different persona on every row: Persona-Mux vs the base model vs multi-LoRA.

    python benchmarks/throughput.py                     # SmolLM2-135M on CPU, 32 rows x 32 new tokens
    python benchmarks/throughput.py --device cuda --dtype bfloat16 --random-llama-8b
    python benchmarks/throughput.py --tiny              # tiny random Llama (tests)

One left-padded batch of ``--rows`` prompts (Shakespeare lines through the chat template, or synthetic token ids
for random models), greedy, exactly ``--max-new-tokens`` new tokens per row (``min_new_tokens`` holds off EOS), the
same prompts for every variant:

* ``base``: the model alone.
* ``personamux``: ``--rows`` registered personas, one per row (``persona_ids=``); the soft prompt adds
  ``num_virtual_tokens`` (20) to every row's prefill.
* ``lora_mixed``: peft LoRA (r=8 on q/v) with per-row ``adapter_names``. One adapter per row would need ``--rows``
  LoRA adapters loaded; ``--lora-adapters`` (4) are loaded and rows take them round-robin.
* ``lora_single``: the same LoRA model with one adapter for the whole batch (no per-row routing), for reference.

Every variant wraps its own module tree over the same weight tensors, and the timed runs are interleaved (the order
rotates each round), so background load hits all variants alike. Reported: new tokens/s (median of ``--repeats``)
and the ratio to the base model (target for Persona-Mux: >= 0.97).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from typing import Any

import _common
import torch

logger = logging.getLogger("benchmarks.throughput")

NAME = "throughput"
TARGET_RATIO = 0.97  # Persona-Mux keeps at least 97 % of the base model's new tokens/s


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_arguments(parser)
    parser.add_argument("--rows", type=int, default=32, help="Batch rows, each with its own persona.")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="New tokens per row (default 32; tiny 8).")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="Synthetic prompts: longest prompt (64).")
    parser.add_argument("--max-chars", type=int, default=200, help="Shakespeare prompts are cut to this length.")
    parser.add_argument("--max-prompt-tokens", type=int, default=128, help="Shakespeare prompts: token limit.")
    parser.add_argument("--lora-adapters", type=int, default=4, help="LoRA adapters loaded; rows use them in turn.")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank.")
    parser.add_argument(
        "--lora-targets", default="q_proj,v_proj", help="Comma-separated LoRA target modules (default q/v)."
    )
    parser.add_argument("--repeats", type=int, default=None, help="Timed runs per variant (default 3; tiny 2).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed runs per variant first.")
    args = parser.parse_args(argv)
    if args.max_new_tokens is None:
        args.max_new_tokens = 8 if args.tiny else 32
    if args.prompt_tokens is None:
        args.prompt_tokens = 12 if args.tiny else 64
    if args.repeats is None:
        args.repeats = 2 if args.tiny else 3
    for key in ("rows", "max_new_tokens", "prompt_tokens", "lora_adapters", "lora_rank", "repeats"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}.")
    return args


# -- inputs ----------------------------------------------------------------------------------------------------------


def shakespeare_prompts(tokenizer, args: argparse.Namespace, placeholder_token_id: int) -> dict[str, torch.Tensor]:
    """One line of each of ``--rows`` characters, formatted as Persona-Mux formats prompts (chat template)."""
    from peft_personamux.collator import build_generation_inputs
    from peft_personamux.data import load_shakespeare

    ds = load_shakespeare(max_chars=args.max_chars)
    first: dict[str, str] = {}
    for persona, prompt in zip(ds["persona"], ds["prompt"]):
        first.setdefault(persona, prompt)
    prompts = [first[p] for p in sorted(first)[: args.rows]]
    while len(prompts) < args.rows:  # fewer characters than rows: reuse lines (personas still differ per row)
        prompts.append(prompts[len(prompts) % len(first)])
    # no text persona: the prompt has no placeholder, so base and LoRA read exactly these ids and Persona-Mux
    # puts its soft prompt first in each row
    return build_generation_inputs(
        tokenizer, prompts, None, placeholder_token_id, max_prompt_tokens=args.max_prompt_tokens
    )


def synthetic_prompts(args: argparse.Namespace, vocab_size: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Random token ids, lengths between half and all of ``--prompt-tokens``, left padded."""
    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(max(1, args.prompt_tokens // 2), args.prompt_tokens + 1, (args.rows,), generator=g)
    width = int(lengths.max())
    ids = torch.full((args.rows, width), pad_id, dtype=torch.long)  # (rows, width)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths.tolist()):
        ids[row, width - n :] = torch.randint(3, vocab_size - 2, (n,), generator=g)  # below the placeholder id
        mask[row, width - n :] = 1
    return {"input_ids": ids, "attention_mask": mask}


# -- variants --------------------------------------------------------------------------------------------------------


def build_variants(base, inputs: dict[str, torch.Tensor], args: argparse.Namespace, mux) -> dict[str, Callable]:
    """name -> a call that generates for the whole batch and returns the sequences."""
    from peft import LoraConfig, get_peft_model

    pad_id = base.generation_config.pad_token_id
    generation = {
        "max_new_tokens": args.max_new_tokens,
        "min_new_tokens": args.max_new_tokens,  # every variant writes exactly as many tokens
        "do_sample": False,
        "pad_token_id": pad_id,
    }
    lora_config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=2 * args.lora_rank,
        target_modules=args.lora_targets.split(","),
        init_lora_weights=False,  # non-zero B: the adapters really change the output (cost is the same)
        task_type="CAUSAL_LM",
    )
    lora_names = [f"lora{i}" for i in range(args.lora_adapters)]
    lora = get_peft_model(_common.shared_weights_copy(base), lora_config, adapter_name=lora_names[0])
    for name in lora_names[1:]:
        lora.add_adapter(name, lora_config)
    lora.set_adapter(lora_names[0])
    lora.eval()
    row_adapters = [lora_names[i % len(lora_names)] for i in range(args.rows)]
    persona_ids = torch.arange(args.rows, device=inputs["input_ids"].device)  # (rows,): a different persona each

    return {
        "base": lambda: base.generate(**inputs, **generation),
        "personamux": lambda: mux.generate(**inputs, persona_ids=persona_ids, **generation),
        "lora_mixed": lambda: lora.generate(**inputs, adapter_names=row_adapters, **generation),
        "lora_single": lambda: lora.generate(**inputs, **generation),
    }


def attach_personamux(base, args: argparse.Namespace):
    """Persona-Mux (paper sizes) on a shared-weights copy, with ``--rows`` personas of random mixtures."""
    from peft import get_peft_model

    from peft_personamux import PersonaMuxConfig

    mux = get_peft_model(_common.shared_weights_copy(base), PersonaMuxConfig(task_type="CAUSAL_LM"))
    num_codes = mux.peft_config["default"].num_codes
    g = torch.Generator().manual_seed(args.seed)
    mixtures = 0.1 * torch.randn(args.rows, num_codes, generator=g)  # (rows, num_codes); values do not change speed
    mux.add_personas([f"persona_{i}" for i in range(args.rows)], mixtures=mixtures)
    mux.freeze()
    return mux.eval()


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    base, tokenizer, model_name = _common.load_model(args, device)
    mux = attach_personamux(base, args)
    config = mux.peft_config["default"]
    if tokenizer is not None:
        inputs = shakespeare_prompts(tokenizer, args, config.placeholder_token_id)
    else:
        vocab_size = base.get_input_embeddings().weight.shape[0]
        inputs = synthetic_prompts(args, vocab_size, base.generation_config.pad_token_id or 0)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    variants = build_variants(base, inputs, args, mux)
    width = inputs["input_ids"].shape[1]

    seconds: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    with torch.inference_mode():
        for name, call in variants.items():
            for _ in range(args.warmup):
                out = call()
            if args.warmup and out.shape[1] != width + args.max_new_tokens:
                raise RuntimeError(f"{name} generated {out.shape[1] - width} tokens, expected {args.max_new_tokens}.")
        for r in range(args.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate who runs first
                elapsed, out = _common.timed(variants[name], device)
                seconds[name].append(elapsed)
                logger.info("round %d %s: %.3f s", r, name, elapsed)

    new_tokens = args.rows * args.max_new_tokens
    results: dict[str, dict[str, Any]] = {}
    for name, values in seconds.items():
        med = _common.median(values)
        results[name] = {
            "seconds": med,
            "seconds_all": values,
            "new_tokens_per_s": new_tokens / med,
            "prefill_tokens_per_row": width + (config.num_virtual_tokens if name == "personamux" else 0),
        }
    base_speed = results["base"]["new_tokens_per_s"]
    for result in results.values():
        result["ratio_vs_base"] = _common.ratio(result["new_tokens_per_s"], base_speed)
    return {
        "model": model_name,
        "results": results,
        "prompt_width": width,
        "prompt_tokens": int(inputs["attention_mask"].sum()),
        "num_virtual_tokens": config.num_virtual_tokens,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = _common.setup(args)
    measured = run(args, device)
    results = measured["results"]
    ratios = {name: r["ratio_vs_base"] for name, r in results.items() if name != "base"}
    payload = {
        "benchmark": NAME,
        "command": _common.command_line(__file__, argv),
        "model": measured["model"],
        "hardware": _common.hardware(device, args.dtype),
        "settings": {
            "rows": args.rows,
            "personas": args.rows,
            "max_new_tokens": args.max_new_tokens,
            "greedy": True,
            "prompt_width": measured["prompt_width"],
            "prompt_tokens_total": measured["prompt_tokens"],
            "personamux_virtual_tokens": measured["num_virtual_tokens"],
            "lora": {"rank": args.lora_rank, "targets": args.lora_targets, "adapters_loaded": args.lora_adapters},
            "repeats": args.repeats,
            "warmup": args.warmup,
            "prompts": "synthetic token ids" if args.tiny or args.random_llama_8b else "Shakespeare, chat template",
        },
        "results": results,
        "ratios": ratios,
        "targets": {"personamux_ratio_min": TARGET_RATIO, "met": ratios["personamux"] >= TARGET_RATIO},
    }
    write(payload, args)
    return payload


def write(payload: dict[str, Any], args: argparse.Namespace) -> None:
    settings = payload["settings"]
    labels = {
        "base": "base model",
        "personamux": f"Persona-Mux, {settings['rows']} personas (persona_ids per row)",
        "lora_mixed": f"LoRA r={args.lora_rank} q/v, {args.lora_adapters} adapters round-robin (adapter_names)",
        "lora_single": f"LoRA r={args.lora_rank} q/v, one adapter for the batch",
    }
    table = _common.markdown_table(
        ["variant", "prefill tokens / row", "seconds (median)", "new tokens / s", "ratio vs base"],
        [
            [labels[name], r["prefill_tokens_per_row"], r["seconds"], r["new_tokens_per_s"], r["ratio_vs_base"]]
            for name, r in payload["results"].items()
        ],
    )
    notes = [
        f"{settings['rows']} rows x {settings['max_new_tokens']} new tokens, greedy, same prompts for every variant "
        f"({settings['prompts']}; padded width {settings['prompt_width']}).",
        f"Persona-Mux target: ratio >= {TARGET_RATIO} (met: {payload['targets']['met']}). Its prefill is "
        f"{settings['personamux_virtual_tokens']} tokens longer per row (the soft prompt).",
        f"LoRA with one adapter per row would need {settings['rows']} adapters loaded; {args.lora_adapters} are "
        "loaded and rows are assigned to them round-robin."
        if args.lora_adapters < settings["rows"]
        else "LoRA: one adapter per row.",
        "Variants share weight tensors and are timed in interleaved rounds (rotating order).",
    ]
    if args.tiny or args.random_llama_8b:
        notes.append("Random weights: only the timings are meaningful.")
    _common.write_report(
        NAME,
        args.output_dir,
        payload,
        "Generation throughput: one persona per row",
        [("New tokens per second", table)],
        notes,
    )
    print(table)


if __name__ == "__main__":
    main()
