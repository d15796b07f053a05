"""Where a training step's time goes: the library's fast loss and today's plain path, by kind of operator.

train_speed.py says how fast each path runs and how close its matrix multiplies come to this CPU's matmul rate;
this says what the rest of the time is. Both stages' rows are train_speed.py's (same model, same rows, same
batches), one untimed warm-up run each, then one run under torch.profiler. Operators are grouped by their self
CPU time (time inside the operator, not its children): matrix multiplies, attention's softmax, dtype casts and
copies, and the rest (norms, rotary, activations, additions and other element-wise work). The profiler adds its
own overhead, and time outside aten operators (Python, the autograd engine) is not in the shares, so the report gives
shares of the profiled operator time, not speeds: a share is an upper bound on what removing those operators saves.
With ``--compile`` a third path per stage is the fast loss with `--compile_layers` (decoder layers and head compiled by
torch.compile): its fused kernels run inside the compiled graphs' calls, reported as their own group, and dynamo's and
the compiled autograd functions' own time as another.

    python benchmarks/train_profile.py            # SmolLM2-135M-Instruct on this CPU
    python benchmarks/train_profile.py --compile  # and the compiled path (needs a C++ compiler; minutes of compiling)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from _common import command_line, hardware, markdown_table, write_report
from torch.profiler import ProfilerActivity, profile
from train_speed import (
    Variant,
    compiled_copy,
    make_batches,
    model_and_rows,
    real_lines_setup,
    rows_parser,
    text_persona,
)

from peft_personamux.collator import PersonaMuxCollator
from peft_personamux.loss import PLAIN, LossOptions, bf16_matmul_speedup, choose_attention

NAME = "train_profile"

# aten operator -> group; anything not listed is "other element-wise"
GROUPS = {
    "matrix multiplies": ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::_mkldnn_matmul"),
    "attention (softmax, fused SDPA kernels)": (
        "aten::_softmax",
        "aten::_softmax_backward_data",
        "aten::_safe_softmax",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    ),
    "casts and copies": ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous"),
}
OTHER = "other element-wise (norms, rotary, activations, sums, ...)"
FUSED = "compiled graphs (inductor's fused kernels, their Python wrappers)"
COMPILED_PREFIX = "## Call CompiledFxGraph"
# torch.compile's own time outside the graphs: guard checks, the compiled autograd functions' forward and backward
OVERHEAD = "dynamo and compiled autograd overhead"
OVERHEAD_KEYS = ("TorchDynamo Cache Lookup", "CompiledFunction", "CompiledFunctionBackward", "Pregraph bytecode")


def group_of(op: str) -> str:
    if op.startswith(COMPILED_PREFIX):
        return FUSED
    if op in OVERHEAD_KEYS:
        return OVERHEAD
    return next((group for group, ops in GROUPS.items() if op in ops), OTHER)


def profiled(variant: Variant, model) -> dict[str, float]:
    """Self CPU microseconds per aten operator (and per compiled graph, all of them summed under one key, and per
    torch.compile overhead event) over one run of ``variant`` (after one untimed warm-up run, which compiles)."""
    variant.run(model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        variant.run(model)
    times: dict[str, float] = {}
    for event in prof.key_averages():
        key = COMPILED_PREFIX + " (all graphs)" if event.key.startswith(COMPILED_PREFIX) else event.key
        counted = key.startswith(("aten::", COMPILED_PREFIX)) or key in OVERHEAD_KEYS
        if counted and event.self_cpu_time_total > 0:
            times[key] = times.get(key, 0.0) + float(event.self_cpu_time_total)
    return times


def summary(times: dict[str, float], top: int) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Shares of the profiled aten time by group, and the ``top`` operators with theirs."""
    total = sum(times.values())
    groups = {group: 0.0 for group in (*GROUPS, OTHER)}
    for op, us in times.items():
        group = group_of(op)
        groups[group] = groups.get(group, 0.0) + us / total
    ranked = sorted(times.items(), key=lambda kv: -kv[1])[:top]
    return groups, [(op, us / total) for op, us in ranked]


def main(argv: Sequence[str] | None = None) -> dict:
    parser = rows_parser(__doc__, 16, "Rows per stage (train_speed.py's first rows).")
    parser.add_argument("--top", type=int, default=12, help="Operators listed one by one per path.")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="Add the fast loss with --compile_layers (decoder layers and head compiled; needs a C++ compiler).",
    )
    args = parser.parse_args(argv)
    device = real_lines_setup(args, "train_profile.py")
    if device.type != "cpu":
        raise SystemExit("train_profile.py groups CPU operator time; run it with --device cpu.")
    model, tokenizer, label, rows, rows1 = model_and_rows(args, device, personas_per_batch=2)
    speedup = bf16_matmul_speedup()
    dtype = torch.bfloat16 if speedup >= 1.25 else None
    fast = LossOptions(autocast_dtype=dtype, attention=choose_attention("cpu", dtype))  # what training runs here
    compiled = compiled_copy(model) if args.compile else None  # as `--compile_layers` trains
    common = dict(max_prompt_tokens=48, max_response_tokens=48)

    one = rows[0]["persona"]
    stage2_rows = [{**r, "persona": one} for r in rows]
    stages = {
        # rows1 are already in the shipped sampler's batch order; stage 2's fast path length-groups its rows
        "stage 1": (PersonaMuxCollator.for_model(model, tokenizer, **common), rows1, None, False),
        "stage 2": (
            PersonaMuxCollator.for_model(model, tokenizer, text_personas={one: text_persona(one)}, **common),
            stage2_rows,
            [one],
            True,
        ),
    }
    tables, records = [], []
    for stage, (collator, stage_rows, trained, grouped) in stages.items():
        if trained:
            model.train_personas(trained)
        batches = make_batches(collator, stage_rows, args.batch_size, False, args.seed)
        fast_batches = make_batches(collator, stage_rows, args.batch_size, True, args.seed) if grouped else batches
        paths = [
            ("the library's fast loss", Variant("fast", fast_batches, fast), model),
            ("plain (today)", Variant("plain", batches, PLAIN, plain_forward=True), model),
        ]
        if compiled is not None:
            if trained:
                compiled.train_personas(trained)
            with_head = dataclasses.replace(fast, compiled_head=True)
            paths.insert(
                1, ("the fast loss + --compile_layers", Variant("compiled", fast_batches, with_head), compiled)
            )
        for path, variant, path_model in paths:
            times = profiled(variant, path_model)
            groups, top = summary(times, args.top)
            records.append({"stage": stage, "path": path, "groups": groups, "top": top, "aten_us": times})
            group_rows = [[g, f"{100 * share:.1f}%"] for g, share in groups.items()]
            op_rows = [[op, group_of(op), f"{100 * share:.1f}%"] for op, share in top]
            tables.append(
                (f"{stage}, {path}: by group", markdown_table(["group", "share of profiled time"], group_rows))
            )
            tables.append((f"{stage}, {path}: top operators", markdown_table(["operator", "group", "share"], op_rows)))
    payload = {
        "command": command_line(__file__, argv),
        "hardware": hardware(device, args.dtype),
        "model": label,
        "rows": args.rows,
        "batch_size": args.batch_size,
        "bf16_matmul_speedup": speedup,
        "fast_autocast": str(dtype),
        "profiles": records,
    }
    notes = [
        f"bf16 matmul on this CPU: {speedup:.2f}x float32, so the fast loss runs with autocast {dtype} and "
        f"attention {fast.attention!r}, as `personamux pretrain` and `add-persona` do here.",
        "Shares are of the summed self CPU time of aten operators (and, with --compile, of the compiled graphs' calls "
        "and torch.compile's overhead events) over one profiled run (forward and backward), after one warm-up run; "
        "the profiler's own overhead is in every operator alike.",
        "A path whose matrix multiplies are a share s of its operator time could run at most about 1/s times "
        "faster with every other operator free (fused away), at the same FLOPs: a loose upper bound, since time "
        "outside aten operators is not counted and removing an operator's time does not always shorten the step "
        "as much (benchmarks/train_speed.py measures speeds).",
    ]
    if args.compile:
        notes.append(
            "'the fast loss + --compile_layers': the same loss on a copy whose decoder layers are compiled, the head "
            "too (`LossOptions.compiled_head`), as `--compile_layers` trains. Inside a compiled graph, inductor's "
            f"fused kernels count as the graph call's self time ('{FUSED}'; matrix multiplies it hands to aten still "
            f"count as aten::mm); '{OVERHEAD}' is the guard checks and the compiled autograd functions' own time."
        )
    write_report(NAME, args.output_dir, payload, "Training step profile: where the time goes", tables, notes)
    return payload


if __name__ == "__main__":
    main()
