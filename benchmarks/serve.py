"""`personamux serve` under load: new tokens/s and latency at 1, 8 and 32 concurrent clients, through one server.

    python benchmarks/serve.py                 # SmolLM2-135M and the shipped codebook, on CPU
    python benchmarks/serve.py --tiny          # tiny random model and codebook (tests)

The server runs in this process on 127.0.0.1 (a free port); client threads send chat completions over HTTP with the
standard library, each a bounded number of requests, greedy, exactly ``--max-tokens`` new tokens (``min_tokens``
holds off the end of turn), so every mode does the same work:

* ``mixed``: every client talks to a different persona (the batch mixes personas);
* ``one persona``: every client talks to the same persona;
* ``base``: the base model through the same server (no soft prompt);
* ``mixed, no prefix cache``: as ``mixed`` with the prefix cache off, so each request prefills its persona prefix
  (up to ``--no-cache-clients`` clients: those prefills run one row at a time).

Reported per mode and concurrency: new tokens/s (all completion tokens over the wall time), p50/p95 request
latency, and the ratio of tokens/s to ``base`` at the same concurrency. Modes run back to back per concurrency, after
a one-token warm-up request per persona (steady state: prefixes cached). serve.json/serve.md are rewritten after
every row, so a run stopped early keeps what it measured (``"complete": false``).
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_arguments(parser)
    parser.add_argument("--codebook", default=None, help="Codebook folder (default: the shipped Shakespeare one).")
    parser.add_argument("--clients", default="1,8,32", help="Comma-separated concurrency levels.")
    parser.add_argument("--requests", type=int, default=None, help="Requests per concurrency level (default 32).")
    parser.add_argument("--max-tokens", type=int, default=None, help="New tokens per request (default 16; tiny 8).")
    parser.add_argument("--max-batch", type=int, default=32, help="Server --max_batch.")
    parser.add_argument("--batch-window-ms", type=float, default=10.0, help="Server --batch_window_ms.")
    parser.add_argument(
        "--no-cache-clients",
        type=int,
        default=8,
        help="Run 'mixed, no prefix cache' up to this many clients only (its prefills are one row each: slow).",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="Seconds one request may take before failing.")
    args = parser.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    if args.requests is None:
        args.requests = 32
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

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: request(port, body(i), args.timeout), range(total)))
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {
        "clients": clients,
        "requests": total,
        "new_tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "p50_s": _percentile(latencies, 50),
        "p95_s": _percentile(latencies, 95),
    }


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    index = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return float(values[index])


def report(args, argv, device, description: str, levels, personas: int, results, stats, done: bool) -> dict:
    """Write serve.json and serve.md with the rows measured so far (called after every row)."""
    results = [dict(r) for r in results]
    by_key = {(r["mode"], r["clients"]): r for r in results}
    for r in results:
        base = by_key.get(("base", r["clients"]))
        r["ratio_vs_base"] = _common.ratio(r["tokens_per_s"], base["tokens_per_s"]) if base else float("nan")
    ratios = {f"{r['mode']} / base @ {r['clients']}": r["ratio_vs_base"] for r in results if r["mode"] != "base"}
    hardware = _common.hardware(device, args.dtype)
    hardware["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    payload = {
        "benchmark": NAME,
        "command": _common.command_line(__file__, argv),
        "model": description,
        "hardware": hardware,
        "complete": done,
        "settings": {
            "clients": levels,
            "requests_per_level": {lvl: max(lvl, args.requests) for lvl in levels},
            "max_tokens": args.max_tokens,
            "max_batch": args.max_batch,
            "batch_window_ms": args.batch_window_ms,
            "personas": personas,
            "no_cache_clients": args.no_cache_clients,
        },
        "results": results,
        "ratios": ratios,
        "engine_stats": stats,
    }
    table = _common.markdown_table(
        ["mode", "clients", "requests", "new tokens / s", "p50 latency (s)", "p95 latency (s)", "ratio vs base"],
        [
            [r["mode"], r["clients"], r["requests"], r["tokens_per_s"], r["p50_s"], r["p95_s"], r["ratio_vs_base"]]
            for r in results
        ],
    )
    notes = [
        f"Greedy, exactly {args.max_tokens} new tokens per request, prompts of one user turn; server max_batch "
        f"{args.max_batch}, batching window {args.batch_window_ms:g} ms; client and server share the machine.",
        "Modes run back to back per concurrency level, after a one-token warm-up request per persona it uses "
        "(prefixes cached).",
        f"Mean rows per decode step over the run: {stats['row_steps'] / max(stats['steps'], 1):.1f} "
        f"(max {stats['max_rows']}); prefix prefills: {stats['prefills']}.",
        f"The 1-minute load average was {hardware['load_average_1min_at_end']} at the end on "
        f"{hardware['cpu_cores']} cores: other jobs shared the CPU, so absolute numbers are noisy and the ratios "
        "are the figures to read.",
    ]
    if not done:
        notes.append("Partial: the run was stopped before every level was measured; the rows above are complete.")
    _common.write_report(
        NAME,
        args.output_dir,
        payload,
        "personamux serve: batched personas under load",
        [("Throughput and latency", table)],
        notes,
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
        app = build_app(model, tokenizer, read_codebook_info(codebook), serve_args)
        engine, base = app.state.engine, app.state.settings.base_name
        personas = model.personas[: max(max(levels), args.requests)]
        cache = engine.prefix_cache
        results: list[dict[str, Any]] = []
        warm: set[str] = set()
        with Server(app) as server:
            for level in levels:
                total = max(level, args.requests)
                mixed = personas[:total]  # a different persona for each request (as far as there are personas)
                modes = {"mixed": mixed, "one persona": personas[:1], "base": [base], "mixed, no prefix cache": mixed}
                cold = [name for name in mixed + [base] if name not in warm]
                if cold:
                    logger.info("Warm-up: %d one-token requests (fills the prefix cache).", len(cold))
                    run_level(server.port, cold, min(8, len(cold)), len(cold), args, tokens=1)
                    warm.update(cold)
                for mode, names in modes.items():
                    if "no prefix cache" in mode and level > args.no_cache_clients:
                        continue
                    engine.prefix_cache = PrefixCache(0) if "no prefix cache" in mode else cache
                    row = run_level(server.port, names, level, total, args)
                    engine.prefix_cache = cache
                    row["mode"] = mode
                    results.append(row)
                    logger.info(
                        "%s, %d clients: %.1f new tokens/s, p50 %.2f s, p95 %.2f s",
                        mode,
                        level,
                        row["tokens_per_s"],
                        row["p50_s"],
                        row["p95_s"],
                    )
                    report(args, argv, device, description, levels, len(personas), results, dict(engine.stats), False)
        stats = dict(engine.stats)
    return report(args, argv, device, description, levels, len(personas), results, stats, True)


if __name__ == "__main__":
    main()
