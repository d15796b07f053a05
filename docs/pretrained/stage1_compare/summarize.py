"""Table of the stage-1 comparison (compare.sh): identity gap over training and final training loss per variant.

python docs/pretrained/stage1_compare/summarize.py runs/stage1_compare > docs/pretrained/stage1_compare/summary.md
"""

import json
import sys
from pathlib import Path


def main(root: str) -> None:
    print("| variant | identity gap by step (shuffled - own, nats) | own loss at the end | last logged train loss |")
    print("|---|---|---|---|")
    for run in sorted(Path(root).iterdir()):
        identity = run / "identity_log.jsonl"
        losses = run / "loss_log.jsonl"
        if not identity.is_file():
            continue
        gaps = [json.loads(line) for line in identity.read_text().splitlines()]
        train = [json.loads(line) for line in losses.read_text().splitlines()] if losses.is_file() else []
        train = [e["loss"] for e in train if "loss" in e]
        cells = ", ".join(f"{g['step']}: {g['identity_gap']:+.4f}" for g in gaps)
        last = f"{train[-1]:.3f}" if train else "n/a"
        print(f"| {run.name} | {cells} | {gaps[-1]['identity_own_loss']:.3f} | {last} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/stage1_compare")
