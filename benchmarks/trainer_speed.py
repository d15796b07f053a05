"""End-to-end training speed: `personamux pretrain` and `add-persona` of an earlier commit vs the current code.

`train_speed.py` times the loss function alone; this one times what a user runs: each command's Trainer loop
(collation, forward, backward, optimizer, logging), read from the Trainer's own ``train_runtime``. The earlier
code is the source tree of ``--old_rev`` (default: the commit that was current when issue 9 was filed, before the
fast loss), extracted with ``git archive`` and run with ``PYTHONPATH`` pointing at it; both sides run on the same
machine, the same rows (same data flags and seed) and the same objective, interleaved in rounds so that other load
hits both alike. The current side uses its defaults (fast loss, length-grouped batches, bf16 autocast where this
CPU's bf16 matmul is faster) plus the shipped pretraining's ``--length_grouped true --personas_per_batch 2``
(docs/pretrained/pretrain_cmd.sh); the earlier side has no such flags.

    python benchmarks/trainer_speed.py                 # SmolLM2-135M-Instruct; 10-25 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

from _common import RESULTS_DIR, command_line, hardware, markdown_table, note_load_at_start, write_report

NAME = "trainer_speed"
ROOT = Path(__file__).resolve().parents[1]
ISSUE_9_REV = "6630196"  # last commit before the fast loss (0c451c6): the code issue 9 measured at 0.3 passes/s
RUNTIME = re.compile(
    r"'train_runtime': '([0-9.]+)'.*'train_samples_per_second': '([0-9.]+)'.*'train_loss': '([0-9.]+)'"
)


def extract(rev: str, into: Path) -> Path:
    """The ``src`` tree of ``rev`` under ``into`` (``git archive``; no checkout is touched)."""
    archive = into / "src.tar"
    with archive.open("wb") as f:
        subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], stdout=f, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def run_cli(src: Path, argv: Sequence[str], log: Path) -> dict[str, float]:
    """Run ``personamux <argv>`` from the source tree ``src``; the Trainer's runtime, samples/s and loss."""
    env = dict(os.environ, PYTHONPATH=str(src), HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    code = "import sys; from peft_personamux.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True)
    text = done.stdout + done.stderr
    log.write_text(text, encoding="utf-8")
    found = RUNTIME.findall(text)
    if done.returncode or not found:
        why = f"failed (exit {done.returncode})" if done.returncode else "printed no train_runtime"
        raise SystemExit(f"personamux {argv[0]} from {src} {why}; its output ends:\n{text[-3000:]}")
    runtime, per_second, loss = map(float, found[-1])
    return {"train_runtime_s": runtime, "passes_per_s": per_second, "train_loss": loss}


def commands(args: argparse.Namespace, out: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Per stage: (argv for the earlier code, argv for the current code)."""
    data = ["--dataset", "shakespeare", "--min_lines", "40", "--pretrain_fraction", "0.75", "--split_seed", "0"]
    data += ["--max_chars", "120"]
    common = ["--report_to", "none", "--save_strategy", "no", "--logging_steps", "1", "--seed", "0"]
    if args.model:
        common += ["--model_name_or_path", args.model]
    stage1 = ["pretrain", "--output_dir", str(out / "pretrain"), *data, *common]
    stage1 += ["--max_personas", str(args.personas), "--max_examples_per_persona", str(args.lines)]
    stage1 += ["--max_prompt_tokens", "48", "--max_response_tokens", "48", "--warmup_epochs", "0"]
    stage1 += ["--per_device_train_batch_size", str(args.batch_size), "--max_steps", str(args.steps)]
    stage1 += ["--learning_rate", "1e-2"]
    stage2 = ["add-persona", "--persona", args.persona, "--save_dir", str(out / "persona"), *data, *common]
    stage2 += ["--num_train", str(args.fit_lines), "--num_eval", "0", "--output_dir", str(out / "fit")]
    stage2 += ["--max_steps", str(args.fit_steps), "--max_response_tokens", "48", "--fit_method", "adam"]
    return {
        "stage 1 (pretrain)": (stage1, [*stage1, "--length_grouped", "true", "--personas_per_batch", "2"]),
        "stage 2 (add-persona, Adam)": (stage2, stage2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old_rev", default=ISSUE_9_REV, help="Commit to compare with (default: issue 9's code).")
    parser.add_argument("--model", default=None, help="HF hub id or local folder. Default: SmolLM2-135M-Instruct.")
    parser.add_argument("--rounds", type=int, default=2, help="Interleaved rounds (median reported).")
    parser.add_argument("--personas", type=int, default=16, help="Stage 1: pretraining characters.")
    parser.add_argument("--lines", type=int, default=4, help="Stage 1: lines per character.")
    parser.add_argument("--batch_size", type=int, default=8, help="Stage 1 batch size.")
    parser.add_argument("--steps", type=int, default=8, help="Stage 1 optimizer steps.")
    parser.add_argument("--persona", default="as_you_like_it/rosalind", help="Stage 2: the unseen character.")
    parser.add_argument("--fit_lines", type=int, default=16, help="Stage 2: training lines (one full batch).")
    parser.add_argument("--fit_steps", type=int, default=4, help="Stage 2: full-batch Adam steps.")
    parser.add_argument("--output-dir", default=str(RESULTS_DIR), help="Folder of the report.")
    args = parser.parse_args(argv)
    for flag in ("rounds", "personas", "lines", "batch_size", "steps", "fit_lines", "fit_steps"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag} must be positive, got {getattr(args, flag)}.")
    note_load_at_start()

    with tempfile.TemporaryDirectory(prefix="trainer_speed_") as tmp:
        tmp_path = Path(tmp)
        old_src = extract(args.old_rev, tmp_path)
        sides = {f"earlier code ({args.old_rev})": old_src, "current code": ROOT / "src"}
        results: dict[str, dict[str, list[dict[str, float]]]] = {}
        for stage, argvs in commands(args, tmp_path / "out").items():
            results[stage] = {side: [] for side in sides}
            for r in range(args.rounds):
                for (side, src), stage_argv in zip(sides.items(), argvs):
                    log = tmp_path / f"{len(results)}_{r}_{'old' if src == old_src else 'new'}.log"
                    measured = run_cli(src, stage_argv, log)
                    print(f"{stage}, round {r + 1}, {side}: {measured}", flush=True)
                    results[stage][side].append(measured)

    tables, summary = [], {}
    for stage, by_side in results.items():
        medians = {s: statistics.median(m["passes_per_s"] for m in runs) for s, runs in by_side.items()}
        base = next(iter(medians.values()))
        rows = [
            [
                s,
                f"{medians[s]:.3f}",
                f"{medians[s] / base:.2f}",
                f"{statistics.median(m['train_loss'] for m in runs):.3f}",
            ]
            for s, runs in by_side.items()
        ]
        summary[stage] = {"passes_per_s": medians, "ratio": {s: medians[s] / base for s in medians}}
        tables.append((stage, markdown_table(["code", "example passes / s", "× earlier", "train loss"], rows)))
    payload = {
        "benchmark": NAME,
        "command": command_line("trainer_speed.py", argv),
        "hardware": hardware("cpu", "float32"),
        "model": args.model or "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)",
        "settings": vars(args),
        "runs": results,
        "summary": summary,
    }
    notes = [
        "Passes/s is the Trainer's train_samples_per_second: optimizer steps x batch rows / train_runtime (model "
        "loading and data preparation are outside it, in both).",
        "Same rows and objective on both sides; the current code groups rows by length and persona, so its batches "
        "(and per-step losses) differ in order, not in content.",
        "Stage 2 fits on each side's own shipped codebook (the earlier tree ships the earlier one), so its training "
        "losses differ; the rows, shapes and optimizer are the same.",
    ]
    write_report(NAME, args.output_dir, payload, "Training speed end to end: earlier code vs current", tables, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
