"""Persona subnetworks: calibration cost per persona, throughput with per-row channel masks, held-out losses.

    python benchmarks/subnetwork.py                       # SmolLM2-135M on CPU: calibration, sizes, throughput
    python benchmarks/subnetwork.py --heldout             # + held-out losses of unseen characters (slow)
    python benchmarks/subnetwork.py --tiny                # tiny random Llama, synthetic lines (tests)

Calibration: for each of ``--personas`` characters, ``--calibration-lines`` of its lines (raw responses, as the
authors' code) run through the frozen decoder; reported are the seconds of those forward passes (statistics), of
building a channel mask and a weight mask from them, and of applying and restoring a weight mask.

Throughput: one left-padded batch of ``--rows`` Shakespeare prompts (chat template, no text persona), greedy,
exactly ``--max-new-tokens`` new tokens per row (KV cache), with timed runs interleaved (the order rotates):

* ``base``: the model alone.
* ``channel_mixed``: every row its own persona's channel mask (rows take the calibrated personas in turn).
* ``channel_single``: one channel mask for every row.
* ``personamux_mixed``: the shipped Persona-Mux codebook, a different persona's mixture on every row.
* ``personamux+channel_mixed``: both on every row.

``--heldout`` runs `peft_personamux.subnetwork.evaluate.heldout_losses` on the evaluation's split (the shipped
codebook's: unseen characters with the most lines, ``--num-train`` lines to calibrate and fit the mixture on,
``--num-test`` held out) and writes ``<output_dir>/subnetwork_heldout.{json,md}``.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import _common
import torch

from peft_personamux.subnetwork import (
    SubnetworkBank,
    SubnetworkConfig,
    apply_weight_mask,
    calibrate_subnetwork,
    collect_statistics,
)

logger = logging.getLogger("benchmarks.subnetwork")

NAME = "subnetwork"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_arguments(parser)
    parser.add_argument("--personas", type=int, default=4, help="Characters calibrated (and mixed in batches).")
    parser.add_argument("--calibration-lines", type=int, default=32, help="Lines per character for calibration.")
    parser.add_argument("--max-chars", type=int, default=120, help="Shakespeare lines are cut to this length.")
    parser.add_argument("--sparsity", type=float, default=0.1, help="Sparsity of the masks timed.")
    parser.add_argument("--rows", type=int, default=8, help="Batch rows for throughput.")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="New tokens per row (default 24; tiny 6).")
    parser.add_argument("--max-prompt-tokens", type=int, default=64, help="Prompt token limit.")
    parser.add_argument("--repeats", type=int, default=None, help="Timed runs per variant (default 3; tiny 2).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed runs per variant first.")
    parser.add_argument("--heldout", action="store_true", help="Also run heldout_losses on unseen characters.")
    parser.add_argument("--heldout-personas", type=int, default=4, help="--heldout: unseen characters.")
    parser.add_argument("--num-train", type=int, default=8, help="--heldout: lines to calibrate / fit on.")
    parser.add_argument("--num-test", type=int, default=6, help="--heldout: held-out lines per character.")
    parser.add_argument("--sparsities", default="0.1,0.3", help="--heldout: comma-separated sparsities.")
    parser.add_argument("--fisher-steps", type=int, default=3, help="--heldout: Fisher steps fitting each mixture.")
    parser.add_argument(
        "--heldout-only", action="store_true", help="Skip calibration and throughput (keeps their results files)."
    )
    args = parser.parse_args(argv)
    if args.max_new_tokens is None:
        args.max_new_tokens = 6 if args.tiny else 24
    if args.repeats is None:
        args.repeats = 2 if args.tiny else 3
    for key in ("personas", "calibration_lines", "rows", "max_new_tokens", "repeats", "num_train", "num_test"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}.")
    if not 0 < args.sparsity < 1:
        parser.error(f"--sparsity must be strictly between 0 and 1, got {args.sparsity}.")
    return args


class TinyTokenizer:
    """Words -> ids below the tiny vocabulary (for --tiny: no real tokenizer)."""

    pad_token_id = 0

    def __call__(self, text: str, truncation: bool = True, max_length: int = 512, **_: Any) -> dict:
        ids = [3 + sum(map(ord, w)) % (_common.TINY_VOCAB - 8) for w in text.split()][:max_length]
        return {"input_ids": ids or [3]}


def persona_lines(args: argparse.Namespace, tokenizer) -> dict[str, list[dict[str, str]]]:
    """``--calibration-lines`` rows of each of the ``--personas`` characters with the most lines."""
    if tokenizer is None or isinstance(tokenizer, TinyTokenizer):
        words = ["night", "prince", "winter", "crown", "sword", "love", "storm", "ghost"]
        return {
            f"play/p{p}": [
                {
                    "persona": f"play/p{p}",
                    "prompt": "Speak.",
                    "response": " ".join(words[(p + i + k) % 8] for k in range(6)),
                }
                for i in range(args.calibration_lines)
            ]
            for p in range(args.personas)
        }
    from peft_personamux.data import load_shakespeare

    ds = load_shakespeare(max_chars=args.max_chars)
    by: dict[str, list[dict[str, str]]] = {}
    for persona, prompt, response in zip(ds["persona"], ds["prompt"], ds["response"]):
        by.setdefault(persona, []).append({"persona": persona, "prompt": prompt, "response": response})
    chosen = sorted(by, key=lambda p: (-len(by[p]), p))[: args.personas]
    return {p: by[p][: args.calibration_lines] for p in sorted(chosen)}


def calibration(model, tokenizer, lines, args, device) -> tuple[dict[str, Any], dict[str, Any]]:
    """Seconds per persona of statistics, channel and weight masks; the masks; weight switch timings."""
    config = SubnetworkConfig(sparsity=args.sparsity, batch_size=8)
    results, masks = {}, {}
    for persona, rows in lines.items():
        t_stats, stats = _common.timed(partial(collect_statistics, model, tokenizer, rows, config, False), device)
        weight_config = SubnetworkConfig(sparsity=args.sparsity, granularity="weight")
        build = partial(calibrate_subnetwork, model, tokenizer, rows, persona, statistics=stats, progress=False)
        t_channel, channel = _common.timed(partial(build, config=config), device)
        t_weight, weight = _common.timed(partial(build, config=weight_config), device)
        tokens = sum(len(tokenizer(r["response"], truncation=True, max_length=512)["input_ids"]) for r in rows)
        results[persona] = {
            "lines": len(rows),
            "tokens": tokens,
            "statistics_s": t_stats,
            "channel_mask_s": t_channel,
            "weight_mask_s": t_weight,
            "channel_mask_bytes": channel.packed_bytes,
            "weight_mask_bytes": weight.packed_bytes,
        }
        masks[persona] = (channel, weight)
        logger.info("calibrated %s: %s", persona, results[persona])
    first_weight = next(iter(masks.values()))[1]
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    start = time.perf_counter()
    handle = apply_weight_mask(model, first_weight)
    t_apply = time.perf_counter() - start
    start = time.perf_counter()
    handle.restore()
    t_restore = time.perf_counter() - start
    exact = all(torch.equal(p, reference[n]) for n, p in model.named_parameters())
    return results, {"masks": masks, "apply_s": t_apply, "restore_s": t_restore, "restore_exact": exact}


def prompts_for(args, tokenizer, model, lines) -> dict[str, torch.Tensor]:
    if isinstance(tokenizer, TinyTokenizer):
        g = torch.Generator().manual_seed(args.seed)
        lengths = torch.randint(4, 12, (args.rows,), generator=g)
        ids = torch.zeros(args.rows, int(lengths.max()), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, n in enumerate(lengths.tolist()):
            ids[row, -n:], mask[row, -n:] = torch.randint(3, _common.TINY_VOCAB - 8, (n,), generator=g), 1
        return {"input_ids": ids, "attention_mask": mask}
    from peft_personamux.collator import build_generation_inputs

    personas = list(lines)
    texts = [lines[personas[i % len(personas)]][i // len(personas)]["prompt"] for i in range(args.rows)]
    vocab = model.get_input_embeddings().weight.shape[0]
    return build_generation_inputs(tokenizer, texts, None, vocab - 1, max_prompt_tokens=args.max_prompt_tokens)


def attach_personamux(model, args, personas: list[str]):
    """The shipped codebook (real model) or a small random one (tiny), on a shared-weights copy."""
    from peft import PeftModel, get_peft_model

    from peft_personamux import PersonaMuxConfig
    from peft_personamux.models import shakespeare_codebook_dir

    copy = _common.shared_weights_copy(model)
    if args.tiny:
        mux = get_peft_model(copy, PersonaMuxConfig(task_type="CAUSAL_LM", num_codes=8, tokens_per_code=2))
    else:
        mux = PeftModel.from_pretrained(copy, str(shakespeare_codebook_dir()))
    num_codes = mux.peft_config["default"].num_codes
    g = torch.Generator().manual_seed(args.seed)
    mux.add_personas(personas, mixtures=0.1 * torch.randn(len(personas), num_codes, generator=g), exist_ok=True)
    return mux.eval()


def throughput(model, tokenizer, lines, masks, args, device) -> dict[str, Any]:
    personas = list(lines)
    inputs = {k: v.to(device) for k, v in prompts_for(args, tokenizer, model, lines).items()}
    bank = SubnetworkBank(model)
    mux = attach_personamux(model, args, personas)
    mux_bank = SubnetworkBank(mux)
    for channel, _ in masks.values():
        bank.add(channel)
        mux_bank.add(channel)
    row_personas = [personas[i % len(personas)] for i in range(args.rows)]
    generation = {
        "max_new_tokens": args.max_new_tokens,
        "min_new_tokens": args.max_new_tokens,
        "do_sample": False,
        "pad_token_id": model.generation_config.pad_token_id,
    }

    def base():
        return model.generate(**inputs, **generation)

    def channel_mixed():
        with bank.apply(row_personas):
            return model.generate(**inputs, **generation)

    def channel_single():
        with bank.apply(personas[0]):
            return model.generate(**inputs, **generation)

    def personamux_mixed():
        return mux.generate(**inputs, persona_ids=row_personas, **generation)

    def personamux_channel_mixed():
        with mux_bank.apply(row_personas):
            return mux.generate(**inputs, persona_ids=row_personas, **generation)

    variants = {
        "base": base,
        "channel_mixed": channel_mixed,
        "channel_single": channel_single,
        "personamux_mixed": personamux_mixed,
        "personamux+channel_mixed": personamux_channel_mixed,
    }
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    width = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        for name, call in variants.items():
            for _ in range(args.warmup):
                out = call()
                if out.shape[1] != width + args.max_new_tokens:
                    raise RuntimeError(f"{name} wrote {out.shape[1] - width} tokens, not {args.max_new_tokens}.")
        for r in range(args.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                elapsed, _ = _common.timed(variants[name], device)
                seconds[name].append(elapsed)
                logger.info("round %d %s: %.3f s", r, name, elapsed)
    new_tokens = args.rows * args.max_new_tokens
    results = {
        name: {"seconds": _common.median(v), "seconds_all": v, "new_tokens_per_s": new_tokens / _common.median(v)}
        for name, v in seconds.items()
    }
    speed = {name: r["new_tokens_per_s"] for name, r in results.items()}
    ratios = {
        "channel_mixed_vs_base": _common.ratio(speed["channel_mixed"], speed["base"]),
        "channel_single_vs_base": _common.ratio(speed["channel_single"], speed["base"]),
        "personamux_mixed_vs_base": _common.ratio(speed["personamux_mixed"], speed["base"]),
        "channel_mixed_vs_personamux_mixed": _common.ratio(speed["channel_mixed"], speed["personamux_mixed"]),
        "personamux+channel_vs_personamux": _common.ratio(
            speed["personamux+channel_mixed"], speed["personamux_mixed"]
        ),
    }
    return {"results": results, "ratios": ratios, "prompt_width": width, "rows": args.rows}


def heldout(model, tokenizer, args) -> dict[str, Any]:
    """`heldout_losses` on the evaluation's split of unseen characters, with the shipped codebook's mixtures."""
    from peft import PeftModel

    from peft_personamux.evaluation.config import EvalConfig
    from peft_personamux.evaluation.data import make_split
    from peft_personamux.models import shakespeare_codebook_dir
    from peft_personamux.subnetwork.evaluate import heldout_losses

    config = EvalConfig(
        num_unseen_personas=args.heldout_personas,
        num_train=args.num_train,
        num_test=args.num_test,
        max_chars=args.max_chars,
        seed=args.seed,
    )
    split = make_split(config)
    mux = PeftModel.from_pretrained(_common.shared_weights_copy(model), str(shakespeare_codebook_dir())).eval()
    sparsities = [float(s) for s in args.sparsities.split(",")]
    start = time.perf_counter()
    result = heldout_losses(
        mux,
        tokenizer,
        split.train,
        split.test,
        sparsities=sparsities,
        fit_steps=args.fisher_steps,
        max_prompt_tokens=args.max_prompt_tokens,
        max_response_tokens=40,
    )
    result["wall_s"] = time.perf_counter() - start
    return result


def heldout_tables(result: dict[str, Any]) -> list[tuple[str, str]]:
    personas = result["personas"]
    variants = list(result["heldout"])
    rows = []
    for v in variants:
        losses = [result["heldout"][v][p] for p in personas]
        rows.append([v, *losses, sum(losses) / len(losses), result["general"].get(v, float("nan"))])
    headers = ["variant", *[p.split("/")[-1] for p in personas], "mean", "general-text loss"]
    return [("Held-out mean token loss (lower is better)", _common.markdown_table(headers, rows))]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = _common.setup(args)
    model, tokenizer, model_name = _common.load_model(args, device)
    tokenizer = tokenizer or TinyTokenizer()
    if args.heldout_only:
        return {"heldout": write_heldout(model, tokenizer, model_name, args, argv, device)}
    lines = persona_lines(args, tokenizer)
    calib, extra = calibration(model, tokenizer, lines, args, device)
    speed = throughput(model, tokenizer, lines, extra["masks"], args, device)
    per = list(calib.values())
    mean = {
        k: sum(r[k] for r in per) / len(per) for k in ("statistics_s", "channel_mask_s", "weight_mask_s", "tokens")
    }
    payload = {
        "benchmark": NAME,
        "command": _common.command_line(__file__, argv),
        "model": model_name,
        "hardware": _common.hardware(device, args.dtype),
        "settings": {k: v for k, v in vars(args).items() if k != "output_dir"},
        "calibration": calib,
        "calibration_mean": mean,
        "weight_mask_switch": {k: extra[k] for k in ("apply_s", "restore_s", "restore_exact")},
        **speed,
    }
    calib_rows = [
        [p, r["lines"], r["tokens"], r["statistics_s"], r["channel_mask_s"], r["weight_mask_s"]]
        for p, r in calib.items()
    ]
    first = next(iter(calib.values()))
    tables = [
        (
            f"Calibration per persona (sparsity {args.sparsity:g}, {torch.get_num_threads()} threads)",
            _common.markdown_table(
                ["persona", "lines", "tokens", "statistics s", "channel mask s", "weight mask s"], calib_rows
            ),
        ),
        (
            "Size per persona",
            _common.markdown_table(
                ["what", "bytes"],
                [
                    ["channel mask (packed bits)", first["channel_mask_bytes"]],
                    ["weight mask", first["weight_mask_bytes"]],
                ],
            ),
        ),
        (
            f"Generation throughput ({args.rows} rows x {args.max_new_tokens} new tokens, greedy, KV cache)",
            _common.markdown_table(
                ["variant", "median s", "new tokens/s"],
                [[n, r["seconds"], r["new_tokens_per_s"]] for n, r in speed["results"].items()],
            ),
        ),
        ("Ratios", _common.markdown_table(["ratio", "value"], [[k, v] for k, v in speed["ratios"].items()])),
    ]
    switch = payload["weight_mask_switch"]
    notes = [
        f"Weight mask: apply {switch['apply_s']:.3f} s, restore {switch['restore_s']:.4f} s, "
        f"restored bit-exact: {switch['restore_exact']}.",
        "Statistics = the forward passes over the persona's lines (LM head skipped); masks are built from them in "
        "the other two columns, so one calibration serves every sparsity and both granularities.",
    ]
    _common.write_report(
        NAME, args.output_dir, payload, "Persona subnetworks: calibration and throughput", tables, notes
    )
    if args.heldout:
        payload["heldout"] = write_heldout(model, tokenizer, model_name, args, argv, device)
    return payload


def write_heldout(model, tokenizer, model_name: str, args, argv, device) -> dict[str, Any]:
    """Run `heldout` and write ``subnetwork_heldout[_train<n>].{json,md}``."""
    result = heldout(model, tokenizer, args)
    name = f"{NAME}_heldout" + ("" if args.num_train == 8 else f"_train{args.num_train}")
    held = {
        "benchmark": name,
        "command": _common.command_line(__file__, argv),
        "model": model_name,
        "hardware": _common.hardware(device, args.dtype),
        "settings": {k: v for k, v in vars(args).items() if k != "output_dir"},
        **result,
    }
    notes = [
        f"{args.num_train} training lines per character (calibration and the mixture's Fisher fit, "
        f"{args.fisher_steps} steps), {args.num_test} held out; general-text loss: the shipped GENERAL_TEXT under "
        "each mask (base model: the base row); `_other` rows use the next character's mask (a control).",
        f"Wall time {result['wall_s']:.0f} s.",
    ]
    title = "Persona subnetworks: held-out loss"
    _common.write_report(name, args.output_dir, held, title, heldout_tables(result), notes)
    return result


if __name__ == "__main__":
    main()
