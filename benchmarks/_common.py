"""Shared pieces of the benchmarks: models, timing, hardware description and the JSON/markdown report.

Every benchmark is one command that compares methods side by side in one run and writes
``<output_dir>/<name>.json`` and ``<output_dir>/<name>.md``. Timings use ``time.perf_counter`` after warm-up runs
(CUDA is synchronised before each clock read) and report medians of repeats.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from peft_personamux.machine import features_label
from peft_personamux.machine import hardware as machine_hardware

logger = logging.getLogger("benchmarks")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY_VOCAB = 128
_LOAD_AT_START: list[float] = []  # `setup`: the 1-min load average before the benchmark's own work


# -- command line ----------------------------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags every benchmark takes: the model, where and in which dtype it runs, threads, seed, output folder."""
    parser.add_argument("--model", default=None, help="HF hub id or local folder. Default: SmolLM2-135M-Instruct.")
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (or 'cuda:N').")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="Base model dtype.")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: all CPU cores; --tiny: 1)."
    )
    parser.add_argument(
        "--random-llama-8b",
        action="store_true",
        help="An 8B-shaped Llama with random weights (hidden 4096, 32 layers, vocab 128256); use with --device "
        "cuda --dtype bfloat16. Only timings are meaningful; data is synthetic.",
    )
    parser.add_argument("--tiny", action="store_true", help="Tiny random Llama and synthetic data (for tests).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of data sampling and random weights.")
    parser.add_argument(
        "--output-dir",
        default=str(RESULTS_DIR),
        help="Folder of <name>.json and <name>.md (default benchmarks/results).",
    )


def setup(args: argparse.Namespace) -> torch.device:
    """Apply threads, seed and logging; return the device (checked to exist)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    chosen = [flag for flag, on in (("--tiny", args.tiny), ("--random-llama-8b", args.random_llama_8b)) if on]
    if args.model is not None:
        chosen.append("--model")
    if len(chosen) > 1:
        raise SystemExit(f"{' and '.join(chosen)} each choose the model: pass one of them.")
    if args.threads is None:
        args.threads = 1 if args.tiny else os.cpu_count() or 1  # a tiny model only loses time to thread hand-offs
    if args.threads < 1:
        raise SystemExit(f"--threads must be positive, got {args.threads}.")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    note_load_at_start()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device.")
    return device


def note_load_at_start() -> None:
    """Read the 1-min load average before the benchmark's own work (`setup` does; scripts without it call this)."""
    _LOAD_AT_START[:] = [os.getloadavg()[0]]


def hardware(device: torch.device | str | None = None, dtype: str | None = None) -> dict[str, Any]:
    """`machine.hardware`, judging whether the machine was busy by the load when `setup` ran: read at the end, the
    load average counts the benchmark's own threads and would call every CPU run busy."""
    return machine_hardware(device, dtype, _LOAD_AT_START[0] if _LOAD_AT_START else None)


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces this run, e.g. ``python benchmarks/fit_speed.py --tiny``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = Path(script).resolve()
    try:
        shown = path.relative_to(Path.cwd())
    except ValueError:
        shown = path
    return shlex.join(["python", str(shown), *argv])


# -- models ----------------------------------------------------------------------------------------------------------


def tiny_llama(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seed: int = 0):
    """A 2-layer, 32-wide random Llama (vocab 128): runs in milliseconds, for tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


def llama_8b_config():
    """Llama-3-8B shapes: hidden 4096, 32 layers, 32 heads, 8 kv heads, intermediate 14336, vocab 128256."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        bos_token_id=128000,
        eos_token_id=128001,
        pad_token_id=128001,
        tie_word_embeddings=False,
    )


def random_llama_8b(dtype: torch.dtype, device: torch.device, seed: int = 0):
    """An 8B-shaped Llama with random weights, created directly on ``device`` in ``dtype`` (no checkpoint)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):  # created in place in dtype: a float32 detour on the CPU would need 32 GB
        model = LlamaForCausalLM._from_config(llama_8b_config(), dtype=dtype)
    model.generation_config.pad_token_id = model.config.pad_token_id
    return model.eval()


def load_model(args: argparse.Namespace, device: torch.device):
    """(model, tokenizer or None, description) for --tiny, --random-llama-8b, --model or the default SmolLM2."""
    dtype = DTYPES[args.dtype]
    if args.tiny:
        return tiny_llama(dtype, device, args.seed), None, "tiny random Llama (2 layers, hidden 32, vocab 128)"
    if args.random_llama_8b:
        return random_llama_8b(dtype, device, args.seed), None, "random Llama, 8B shapes (Llama-3-8B config)"
    from peft_personamux.models import load_base_model

    model, tokenizer = load_base_model(args.model, dtype=dtype, device=str(device))
    return model.eval(), tokenizer, args.model or "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)"


def shared_weights_copy(model):
    """A second module tree over the *same* weight tensors (no memory copied).

    Each method under comparison wraps its own copy, so peft's in-place injection into one never touches the others
    and the base model stays unwrapped, even for an 8B model that would not fit in memory three times.
    """
    with torch.device("meta"):
        clone = type(model)(copy.deepcopy(model.config))
    clone.load_state_dict(model.state_dict(keep_vars=True), assign=True, strict=True)
    for name, buffer in model.named_buffers():  # non-persistent buffers (rotary inv_freq) are not in state_dict
        module_name, _, buffer_name = name.rpartition(".")
        clone.get_submodule(module_name)._buffers[buffer_name] = buffer
    left = [n for n, t in [*clone.named_parameters(), *clone.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"shared_weights_copy left tensors on the meta device: {left[:5]}")
    clone.generation_config = copy.deepcopy(model.generation_config)
    return clone.eval()


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# -- timing ----------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of one call; CUDA work queued before or by ``fn`` is waited for."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    batch, heads, q_len, dim = query
    return 4 * batch * heads * q_len * key[-2] * dim  # q @ k^T and p @ v; grouped keys counted at the query's heads


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return 2 * _cpu_attention_flops(query, key, value)  # gradients of both products, two operands each


def count_flops(fn: Callable[[], Any]) -> int:
    """Matrix-multiply FLOPs of one call of ``fn`` (forward and any backward it runs), as torch's
    ``FlopCounterMode`` counts them (mm, bmm, addmm, convolution and attention kernels; elementwise work is free).
    Torch's CPU attention kernel is counted like its eager form (torch 2.13 leaves it out)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    counter = FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
        },
    )
    with counter:
        fn()
    return int(counter.get_total_flops())


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")


# -- report ----------------------------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "n/a" if value != value else f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(
    name: str,
    output_dir: str | os.PathLike,
    payload: dict[str, Any],
    title: str,
    tables: Sequence[tuple[str, str]],
    notes: Sequence[str] = (),
) -> tuple[Path, Path]:
    """Write ``<name>.json`` (``payload``) and ``<name>.md`` (command, hardware, tables, notes); return both paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    hw = payload["hardware"]
    where = f"GPU {hw['gpu']}" if "gpu" in hw else f"CPU {hw['cpu']} ({features_label(hw)}), {hw['cpu_cores']} cores"
    parts = [
        f"# {title}",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"Hardware: {where}, torch {hw['torch']} ({hw['torch_threads']} threads), transformers "
        f"{hw['transformers']}, peft {hw['peft']}, dtype {hw['dtype']}. Model: {payload['model']}.",
    ]
    if "load_average_1min" in hw:
        parts.append(
            f"\nThe machine was busy when the run started (1-min load average {hw['load_average_1min']}): timings "
            "are noisy."
        )
    for heading, table in tables:
        parts += ["", f"## {heading}", "", table]
    if notes:
        parts += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    md_path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    logger.info("wrote %s and %s", json_path, md_path)
    return json_path, md_path
