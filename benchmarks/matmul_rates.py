"""This CPU's matrix-multiply rate in float32 and bf16, round by round: at the shape `loss.bf16_matmul_speedup` probes
and at SmolLM2-135M's projection shapes (the shapes train_speed.py's roofline uses).

`machine.matmul_rate` keeps the fastest of its rounds; before it did, the library's probe timed one round. This
benchmark times ``--rounds`` interleaved rounds of each dtype and shape set and reports the first, the median and the
fastest, so the spread a single round hides is in the file:

    cd benchmarks && python matmul_rates.py
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Sequence

import torch
from _common import RESULTS_DIR, command_line, hardware, markdown_table, note_load_at_start, write_report

from peft_personamux.machine import matmul_rate

NAME = "matmul_rates"
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}


def shape_sets(tokens: int, hidden: int, inner: int) -> dict[str, list[tuple[int, int, int]]]:
    """(m, k, n) products: the library probe's one shape, and the decoder's three projections at ``tokens`` rows."""
    return {
        "probe (1024 x 576 x 1536)": [(1024, 576, 1536)],
        f"model projections ({tokens} tokens)": [
            (tokens, hidden, hidden),
            (tokens, hidden, inner),
            (tokens, inner, hidden),
        ],
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="Timed rounds per dtype and shape set (interleaved).")
    parser.add_argument("--repeats", type=int, default=10, help="Products per shape in one round.")
    parser.add_argument(
        "--tokens", type=int, default=680, help="Rows of the model's products (train_speed's plain batch)."
    )
    parser.add_argument("--hidden", type=int, default=576, help="SmolLM2-135M's hidden size.")
    parser.add_argument("--inner", type=int, default=1536, help="SmolLM2-135M's MLP size.")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: all CPU cores; --tiny: 1)."
    )
    parser.add_argument("--output-dir", default=None, help="Folder of the report (default benchmarks/results).")
    parser.add_argument("--tiny", action="store_true", help="One small shape (for tests).")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1:
        raise SystemExit(f"--rounds and --repeats must be >= 1, got {args.rounds} and {args.repeats}.")
    threads = args.threads or (1 if args.tiny else os.cpu_count() or 1)
    if threads < 1:
        raise SystemExit(f"--threads must be positive, got {threads}.")
    torch.set_num_threads(threads)
    note_load_at_start()
    sets = shape_sets(args.tokens, args.hidden, args.inner) if not args.tiny else {"tiny": [(16, 8, 8)]}
    rates: dict[str, dict[str, list[float]]] = {name: {d: [] for d in DTYPES} for name in sets}
    for _ in range(args.rounds):  # interleaved: every dtype and shape set sees the same machine state
        for name, shapes in sets.items():
            for label, dtype in DTYPES.items():
                rates[name][label].append(matmul_rate(dtype, shapes, repeats=args.repeats, rounds=1))
    records = []
    for name, by_dtype in rates.items():
        summary = {
            label: {"first": r[0], "median": statistics.median(r), "best": max(r), "rounds": r}
            for label, r in by_dtype.items()
        }
        records.append(
            {
                "shapes": name,
                **summary,
                "bf16_over_float32": {
                    k: summary["bf16"][k] / summary["float32"][k] for k in ("first", "median", "best")
                },
            }
        )
    rows = [
        [
            r["shapes"],
            *(f"{r[d][k] / 1e9:.0f}" for d in DTYPES for k in ("first", "median", "best")),
            *(f"{r['bf16_over_float32'][k]:.2f}x" for k in ("first", "median", "best")),
        ]
        for r in records
    ]
    headers = [
        "shapes",
        *(f"{d} GFLOP/s, {k}" for d in DTYPES for k in ("first round", "median", "best")),
        *(f"bf16 / float32, {k}" for k in ("first round", "median", "best")),
    ]
    payload = {
        "benchmark": NAME,
        "command": command_line(__file__, argv),
        "model": "none (matrix products of SmolLM2-135M's shapes)",
        "hardware": hardware("cpu", "float32 and bf16"),
        "settings": {"rounds": args.rounds, "repeats": args.repeats, "tokens": args.tokens},
        "results": records,
    }
    notes = [
        f"{args.rounds} interleaved rounds per dtype and shape set, {args.repeats} products per shape each; a "
        "round's rate is its FLOPs over its seconds. `loss.bf16_matmul_speedup` measures the probe's shape the "
        "same way with fewer products (the best of 3 rounds of 5 products per dtype); train_speed.py's ceilings use "
        "the best of 3 rounds of 10 at the model's shapes.",
    ]
    write_report(
        NAME,
        args.output_dir or RESULTS_DIR,
        payload,
        "Matrix-multiply rate, float32 and bf16",
        [("Rates", markdown_table(headers, rows))],
        notes,
    )
    return payload


if __name__ == "__main__":
    main()
