"""`personamux serve` under load: new tokens/s and latency at 1, 8 and 32 concurrent clients, through one server.

    python benchmarks/serve.py --threads 1     # SmolLM2-135M and the shipped codebook, on CPU
    python benchmarks/serve.py --tiny          # tiny random model and codebook (tests)

The server runs in this process on 127.0.0.1 (a free port); client threads send chat completions over HTTP with the
standard library, each a bounded number of requests, greedy, exactly ``--max-tokens`` new tokens (``min_tokens``
holds off the end of turn), so every mode does the same work:

* ``mixed``: every request of a level talks to a different persona (the batch mixes personas);
* ``one persona``: every request talks to the same persona;
* ``base``: the base model through the same server (no soft prompt);
* ``mixed, no prefix cache``: as ``mixed`` with the prefix cache off, so each request prefills its persona prefix.

The modes are interleaved: each of ``--rounds`` rounds runs every level and every mode once (the mode order rotates
between rounds), so a machine whose free CPU drifts (shared with other jobs) slows every mode alike. Reported per
mode and level over all rounds: new tokens/s (completion tokens over the summed wall time), p50/p95 request latency,
the process CPU seconds per new token (server and clients: robust to CPU taken by other processes), and both as
ratios to ``base`` at the same level, with the per-round wall-time ratios to show their spread. serve.json/serve.md
are rewritten after every round; ``--max-minutes`` ends the run after the round in progress (``"complete": false``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import _common
import torch

logger = logging.getLogger("benchmarks.serve")

NAME = "serve"
PROMPTS = ["Who goes there?", "What news from the court?", "Where is the king?", "Why do you weep?"]
MODES = ["mixed", "one persona", "base", "mixed, no prefix cache"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_arguments(parser)
    parser.add_argument("--codebook", default=None, help="Codebook folder (default: the shipped Shakespeare one).")
    parser.add_argument("--clients", default="1,8,32", help="Comma-separated concurrency levels.")
    parser.add_argument(
        "--requests", type=int, default=8, help="Requests per level and round (at least the level's clients)."
    )
    parser.add_argument("--max-tokens", type=int, default=None, help="New tokens per request (default 16; tiny 8).")
    parser.add_argument("--max-batch", type=int, default=32, help="Server --max_batch.")
    parser.add_argument("--batch-window-ms", type=float, default=10.0, help="Server --batch_window_ms.")
    parser.add_argument(
        "--no-cache-clients",
        type=int,
        default=32,
        help="Run 'mixed, no prefix cache' up to this many clients only (its prefills are one row each).",
    )
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds of every level and mode.")
    parser.add_argument(
        "--max-minutes", type=float, default=60.0, help="Start no new round after this many minutes of measuring."
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="Seconds one request may take before failing.")
    parser.add_argument(
        "--decode-step-only",
        action="store_true",
        help="Only time one decode step of the largest level's rows, base vs persona row lengths (serve_decode_step).",
    )
    args = parser.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    for name in ("requests", "rounds"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    if args.max_tokens is None:
        args.max_tokens = 8 if args.tiny else 16
    if args.random_llama_8b:
        raise SystemExit("--random-llama-8b has no tokenizer for a chat server; use --model or the default.")
    return args


def tiny_codebook(root: Path, personas: int):
    """A tiny random Llama with a byte-level BPE tokenizer (ChatML template) and a codebook of ``personas``."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from peft_personamux import PersonaMuxConfig
    from peft_personamux.evaluation.loading import save_tiny_model

    model_dir = save_tiny_model(root / "model", PROMPTS * 8, vocab_size=300)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        PersonaMuxConfig(task_type="CAUSAL_LM", num_codes=4, tokens_per_code=2),
    )
    model.add_personas([f"tiny/p{i}" for i in range(personas)], mixtures=torch.randn(personas, 4))
    model.save_pretrained(root / "codebook")
    return model_dir, root / "codebook"


class Server:
    """``personamux serve``'s app under uvicorn on 127.0.0.1 in a thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("The server did not start in 60 s.")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def request(port: int, body: dict[str, Any], timeout: float) -> tuple[float, int]:
    """(seconds, completion tokens) of one chat completion."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        data = json.loads(response.read())
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {data}")
    return time.perf_counter() - start, data["usage"]["completion_tokens"]


def run_level(port: int, models: list[str], clients: int, total: int, args, tokens: int | None = None) -> dict:
    """``total`` requests from ``clients`` threads; request i goes to ``models[i % len(models)]``."""
    tokens = tokens or args.max_tokens

    def body(i: int) -> dict[str, Any]:
        return {
            "model": models[i % len(models)],
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": tokens,
            "min_tokens": tokens,
            "temperature": 0,
        }

    cpu, start = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: request(port, body(i), args.timeout), range(total)))
    return {
        "seconds": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu,
        "latencies": [r[0] for r in results],
        "new_tokens": sum(r[1] for r in results),
    }


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    index = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return float(values[index])


def prompt_positions(model, tokenizer, info, persona: str | None) -> int:
    """Positions the benchmark's first prompt takes for ``persona`` (None: the base model), as the server counts."""
    from peft_personamux.conversation import encode_conversation, num_positions

    config = model.peft_config["default"]
    text_persona = info.text_personas.get(persona) if persona else None
    messages = [{"role": "user", "content": PROMPTS[0]}]
    encoded = encode_conversation(
        tokenizer, messages, config.placeholder_token_id, text_persona, info.instruction, persona is not None
    )
    virtual = 0 if persona is None else config.num_virtual_tokens
    return num_positions(encoded.input_ids, config.placeholder_token_id, virtual)


@torch.no_grad()
def step_cost(engine, lengths: dict[str, int], rows: int, repeats: int = 3) -> dict[str, dict[str, float]]:
    """CPU ms of one decode step of ``rows`` rows over cached key/values of each length (random values).

    The engine's own batched forward (`BatchEngine.forward`), interleaved over ``repeats`` rounds; median kept.
    """
    from peft_personamux.server.kv import to_cache

    config = engine.model.get_base_model().config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    device = next(engine.model.parameters()).device
    times: dict[str, list[float]] = {name: [] for name in lengths}
    for _ in range(repeats):
        for name, length in lengths.items():
            shape = (rows, config.num_key_value_heads, length, head_dim)
            kv = [(torch.randn(shape, device=device), torch.randn(shape, device=device))]
            kv = kv * config.num_hidden_layers  # the same tensors per layer: the cost is the same
            ids = torch.zeros(rows, 1, dtype=torch.long, device=device)  # (rows, 1)
            mask = torch.ones(rows, length + 1, dtype=torch.long, device=device)  # (rows, length + 1)
            positions = torch.full((rows, 1), length, dtype=torch.long, device=device)  # (rows, 1)
            with engine.lock:
                start = time.process_time()
                engine.forward(ids, mask, positions, to_cache([(k, v) for k, v in kv]))
                times[name].append(1000 * (time.process_time() - start))
    return {name: {"kv_length": lengths[name], "cpu_ms_per_step": _common.median(t)} for name, t in times.items()}


def decode_steps(model, tokenizer, info, engine, args) -> dict[str, dict[str, float]]:
    """`step_cost` of the largest level's rows at the mean length of a base row and a persona row while decoding."""
    rows, persona = max(args.clients), model.personas[0]
    lengths = {
        "base": prompt_positions(model, tokenizer, info, None) + args.max_tokens // 2,
        "persona": prompt_positions(model, tokenizer, info, persona) + args.max_tokens // 2,
    }
    steps = step_cost(engine, lengths, rows)
    logger.info("Decode step of %d rows: %s", rows, steps)
    return steps


def decode_step_table(steps: dict[str, dict[str, float]], rows: int) -> tuple[str, str]:
    base = steps["base"]["cpu_ms_per_step"]
    table = [
        [n, s["kv_length"], s["cpu_ms_per_step"], _common.ratio(base, s["cpu_ms_per_step"])] for n, s in steps.items()
    ]
    heading = f"One decode step of {rows} rows (CPU ms, median of 3, interleaved)"
    return heading, _common.markdown_table(["row", "cached positions", "CPU ms / step", "ratio vs base"], table)


DECODE_STEP_NOTE = (
    "Decode step: the engine's batched forward of one token per row over key/values of the mean length a row has "
    "while decoding here (its prompt positions, soft prompt included, plus half the new tokens), with nothing else "
    "running in the process: what a longer prompt alone costs each step."
)


def decode_step_report(args, argv, device, description: str, steps) -> dict[str, Any]:
    """Write serve_decode_step.json/.md (``--decode-step-only``)."""
    hardware = _common.hardware(device, args.dtype)
    hardware["nice"] = os.nice(0)
    payload = {
        "benchmark": f"{NAME}_decode_step",
        "command": _common.command_line(__file__, argv),
        "model": description,
        "hardware": hardware,
        "settings": {"rows": max(args.clients), "max_tokens": args.max_tokens},
        "decode_step": steps,
    }
    title = "personamux serve: the cost of a persona row's longer prompt, per decode step"
    tables = [decode_step_table(steps, max(args.clients))]
    _common.write_report(f"{NAME}_decode_step", args.output_dir, payload, title, tables, [DECODE_STEP_NOTE])
    return payload


def summarize(runs: dict[tuple[str, int], list[dict]]) -> list[dict[str, Any]]:
    """One row per (mode, clients) over its rounds, with ratios to ``base`` at the same level."""
    rows = {}
    for (mode, clients), measured in runs.items():
        tokens, wall = sum(m["new_tokens"] for m in measured), sum(m["seconds"] for m in measured)
        latencies = [t for m in measured for t in m["latencies"]]
        cpu = sum(m["cpu_s"] for m in measured)
        rows[mode, clients] = {
            "mode": mode,
            "clients": clients,
            "rounds": len(measured),
            "requests": len(latencies),
            "new_tokens": tokens,
            "seconds": wall,
            "tokens_per_s": tokens / wall,
            "p50_s": _percentile(latencies, 50),
            "p95_s": _percentile(latencies, 95),
            "cpu_s": cpu,
            "cpu_ms_per_token": 1000 * cpu / tokens,
            "tokens_per_s_by_round": [m["new_tokens"] / m["seconds"] for m in measured],
        }
    for row in rows.values():
        base = rows.get(("base", row["clients"]))
        row["ratio_vs_base"] = _common.ratio(row["tokens_per_s"], base["tokens_per_s"]) if base else float("nan")
        row["cpu_ratio_vs_base"] = (
            _common.ratio(base["cpu_ms_per_token"], row["cpu_ms_per_token"]) if base else float("nan")
        )
        rounds = min(len(row["tokens_per_s_by_round"]), len(base["tokens_per_s_by_round"])) if base else 0
        row["ratio_vs_base_by_round"] = [
            _common.ratio(row["tokens_per_s_by_round"][k], base["tokens_per_s_by_round"][k]) for k in range(rounds)
        ]
    order = {mode: k for k, mode in enumerate(MODES)}
    return sorted(rows.values(), key=lambda r: (r["clients"], order[r["mode"]]))


def report(args, argv, device, description: str, levels, personas: int, runs, stats, rounds: int, steps=None):
    """Write serve.json and serve.md with the rounds measured so far (called after every round).

    ``steps`` (from `step_cost`, measured once the rounds are done) marks the report complete.
    """
    done = steps is not None
    results = summarize(runs)
    ratios = {f"{r['mode']} / base @ {r['clients']}": r["ratio_vs_base"] for r in results if r["mode"] != "base"}
    hardware = _common.hardware(device, args.dtype)
    hardware["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    hardware["nice"] = os.nice(0)
    payload = {
        "benchmark": NAME,
        "command": _common.command_line(__file__, argv),
        "model": description,
        "hardware": hardware,
        "complete": done,
        "rounds_done": rounds,
        "settings": {
            "clients": levels,
            "requests_per_level_and_round": {lvl: max(lvl, args.requests) for lvl in levels},
            "rounds": args.rounds,
            "max_tokens": args.max_tokens,
            "max_batch": args.max_batch,
            "batch_window_ms": args.batch_window_ms,
            "personas": personas,
            "no_cache_clients": args.no_cache_clients,
        },
        "results": results,
        "ratios": ratios,
        "engine_stats": stats,
        "decode_step": steps,
    }
    table = _common.markdown_table(
        [
            "mode",
            "clients",
            "requests",
            "new tokens / s",
            "p50 latency (s)",
            "p95 latency (s)",
            "ratio vs base",
            "ratio by round",
            "CPU ms / token",
            "CPU ratio vs base",
        ],
        [
            [
                r["mode"],
                r["clients"],
                r["requests"],
                r["tokens_per_s"],
                r["p50_s"],
                r["p95_s"],
                r["ratio_vs_base"],
                " ".join(f"{x:.2f}" for x in r["ratio_vs_base_by_round"]),
                r["cpu_ms_per_token"],
                r["cpu_ratio_vs_base"],
            ]
            for r in results
        ],
    )
    notes = [
        f"Greedy, exactly {args.max_tokens} new tokens per request, prompts of one user turn; server max_batch "
        f"{args.max_batch}, batching window {args.batch_window_ms:g} ms; client and server share the process.",
        f"{rounds} interleaved rounds (every level and mode once per round, the mode order rotating), after a "
        "one-token warm-up request per persona used (prefixes cached). Tokens/s is over the rounds' summed wall time; "
        "p50/p95 over every request; ratios > 1 are faster than the base model.",
        "CPU ms / token is the process's CPU time (server and client threads) per new token: other processes "
        "taking the CPU do not change it, so its ratio is the steadier measure of what a mode costs.",
        f"Mean rows per decode step over the run: {stats['row_steps'] / max(stats['steps'], 1):.1f} "
        f"(max {stats['max_rows']}); prefix prefills: {stats['prefills']}.",
        f"The 1-minute load average was {hardware['load_average_1min_at_end']} at the end on "
        f"{hardware['cpu_cores']} cores (this process at nice {hardware['nice']}, torch at "
        f"{hardware['torch_threads']} thread(s)): other jobs shared the CPU, so absolute numbers are noisy.",
    ]
    tables = [("Throughput and latency", table)]
    if steps:
        tables.append(decode_step_table(steps, max(levels)))
        notes.append(DECODE_STEP_NOTE)
    if not done:
        notes.append(f"Partial: {rounds} of {args.rounds} rounds measured.")
    _common.write_report(
        NAME, args.output_dir, payload, "personamux serve: batched personas under load", tables, notes
    )
    return payload


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import tempfile

    from peft_personamux.codebook_loading import load_codebook_model, read_codebook_info, resolve_codebook_dir
    from peft_personamux.server import ServeArguments, build_app
    from peft_personamux.server.kv import PrefixCache

    args = parse_args(argv)
    device = _common.setup(args)
    if device.type != "cpu":
        logger.info("The server loads the model on the default device (CUDA when available).")
    levels = sorted(set(args.clients))
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            model_dir, codebook = tiny_codebook(Path(tmp), max(levels))
            model_name, description = str(model_dir), "tiny random Llama (2 layers, hidden 32) + tiny codebook"
        else:
            codebook, model_name = resolve_codebook_dir(args.codebook), args.model
            description = args.model or "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized) + shipped codebook"
        model, tokenizer = load_codebook_model(codebook, model_name, args.dtype)
        serve_args = ServeArguments(
            persona_dir="",
            max_batch=args.max_batch,
            batch_window_ms=args.batch_window_ms,
            max_queue=4 * args.max_batch,
            prefix_cache_size=max(levels) + 1,
        )
        info = read_codebook_info(codebook)
        app = build_app(model, tokenizer, info, serve_args)
        engine, base = app.state.engine, app.state.settings.base_name
        personas = model.personas[: max(max(levels), args.requests)]
        if args.decode_step_only:
            return decode_step_report(
                args, argv, device, description, decode_steps(model, tokenizer, info, engine, args)
            )
        cache = engine.prefix_cache
        runs: dict[tuple[str, int], list[dict]] = {}
        rounds = 0
        with Server(app) as server:
            logger.info("Warm-up: one one-token request per persona and the base model (fills the prefix cache).")
            run_level(server.port, personas + [base], min(8, len(personas) + 1), len(personas) + 1, args, tokens=1)
            start = time.monotonic()
            for rounds in range(1, args.rounds + 1):
                for level in levels:
                    total = max(level, args.requests)
                    names = {
                        "mixed": personas[:total],  # a different persona for each request (as far as there are)
                        "one persona": personas[:1],
                        "base": [base],
                        "mixed, no prefix cache": personas[:total],
                    }
                    modes = [m for m in MODES if "no prefix cache" not in m or level <= args.no_cache_clients]
                    shift = (rounds - 1) % len(modes)
                    for mode in modes[shift:] + modes[:shift]:
                        engine.prefix_cache = PrefixCache(0) if "no prefix cache" in mode else cache
                        try:
                            measured = run_level(server.port, names[mode], level, total, args)
                        finally:
                            engine.prefix_cache = cache
                        runs.setdefault((mode, level), []).append(measured)
                        logger.info(
                            "round %d, %s, %d clients: %.1f new tokens/s, %.0f CPU ms/token",
                            rounds,
                            mode,
                            level,
                            measured["new_tokens"] / measured["seconds"],
                            1000 * measured["cpu_s"] / measured["new_tokens"],
                        )
                report(args, argv, device, description, levels, len(personas), runs, dict(engine.stats), rounds)
                if rounds < args.rounds and time.monotonic() - start > 60 * args.max_minutes:
                    logger.info("Stopping after round %d: --max-minutes %g passed.", rounds, args.max_minutes)
                    break
        stats = dict(engine.stats)
        if rounds < args.rounds:
            return report(args, argv, device, description, levels, len(personas), runs, stats, rounds)
        steps = decode_steps(model, tokenizer, info, engine, args)
    return report(args, argv, device, description, levels, len(personas), runs, stats, rounds, steps)


if __name__ == "__main__":
    main()
