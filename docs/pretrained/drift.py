"""How far W and b moved between checkpoints of a pretraining run, against Adam's two limits.

    python docs/pretrained/drift.py CHECKPOINT_DIR [CHECKPOINT_DIR ...] [--out FILE.json]

Adam moves each element by at most about the learning rate per step. Over the steps between two checkpoints an
element whose gradient keeps its sign moves up to ``sum(lr)`` ("consistent"); one whose gradient sign is noise moves
like a random walk, about ``sqrt(sum(lr**2))``. The measured RMS change per element, placed between the two, says
whether the shared weights learned something or drifted: near the random-walk scale the run is mostly noise. The
learning rates come from each checkpoint's ``trainer_state.json`` (logged every ``logging_steps``).
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
from pathlib import Path

from safetensors.torch import load_file


def learning_rates(state_file: Path) -> dict[int, float]:
    """Logged learning rate by step (the shared group's, as transformers logs it)."""
    history = json.loads(state_file.read_text())["log_history"]
    return {int(h["step"]): float(h["learning_rate"]) for h in history if "learning_rate" in h}


def lr_sums(rates: dict[int, float], start: int, end: int) -> tuple[float, float]:
    """(sum of lr, sqrt of sum of lr^2) over steps start+1..end, each step at the last logged rate before it."""
    logged = sorted(rates)
    total, squares = 0.0, 0.0
    for step in range(start + 1, end + 1):
        lr = rates[logged[max(bisect.bisect_right(logged, step) - 1, 0)]]
        total, squares = total + lr, squares + lr * lr
    return total, math.sqrt(squares)


def step_of(folder: Path) -> int:
    """The optimizer step of a ``checkpoint-N`` folder."""
    return int(folder.name.rsplit("-", 1)[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint-N folders, two or more")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    folders = sorted(args.checkpoints, key=step_of)
    if len(folders) < 2:
        raise SystemExit("Give at least two checkpoint folders.")
    rates = learning_rates(folders[-1] / "trainer_state.json")
    rows = []
    header = ("steps", "tensor", "norm at start", "relative change", "RMS change per element", "random-walk scale")
    print("| " + " | ".join(header) + " | consistent scale |")
    print("|---|---|---|---|---|---|---|")
    for a, b in zip(folders, folders[1:]):
        start, end = step_of(a), step_of(b)
        consistent, walk = lr_sums(rates, start, end)
        before, after = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
        for key in sorted(before):
            x, y = before[key].float(), after[key].float()
            name = key.rsplit(".", 1)[-1].removeprefix("personamux_")
            rms = float((y - x).pow(2).mean().sqrt())
            row = {
                "from": start,
                "to": end,
                "tensor": name,
                "norm": float(x.norm()),
                "relative_change": float((y - x).norm() / x.norm()),
                "rms_change": rms,
                "random_walk": walk,
                "consistent": consistent,
            }
            rows.append(row)
            print(
                f"| {start}-{end} | {name} | {row['norm']:.1f} | {row['relative_change']:.3f} | {rms:.4f} | "
                f"{walk:.4f} | {consistent:.3f} |"
            )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
