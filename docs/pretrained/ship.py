"""Copy a finished `personamux pretrain` run into the package as the shipped codebook, and its logs into docs/.

    python docs/pretrained/ship.py runs/shakespeare-pretrain

The adapter's base_model_name_or_path becomes the `smollm2-135m-instruct` sentinel (not this machine's path).
"""

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "peft_personamux" / "pretrained" / "shakespeare"
DOCS = ROOT / "docs" / "pretrained"


def main(run: str) -> None:
    run_dir = Path(run)
    for name in ("adapter_config.json", "adapter_model.safetensors", "personas", "personamux_pretrain.json"):
        if not (run_dir / name).exists():
            raise SystemExit(f"{run_dir / name} is missing: is the run finished?")
    shutil.rmtree(PACKAGE, ignore_errors=True)
    PACKAGE.mkdir(parents=True)
    shutil.copytree(run_dir / "personas", PACKAGE / "personas")
    shutil.copy2(run_dir / "adapter_model.safetensors", PACKAGE)
    shutil.copy2(run_dir / "personamux_pretrain.json", PACKAGE)
    config = json.loads((run_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "smollm2-135m-instruct"
    (PACKAGE / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for name in ("loss_log.jsonl", "loss_curve.png", "identity_log.jsonl"):
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, DOCS / name)
    identity = run_dir / "identity_log.jsonl"
    if identity.exists():
        plot_identity(identity, DOCS / "identity_gap.png")
    print(f"Shipped {len(list((PACKAGE / 'personas').rglob('*.safetensors')))} personas to {PACKAGE}.")


def plot_identity(log: Path, path: Path) -> None:
    """The persona-identity diagnostic over training: held-out loss with own vs another persona's mixture."""
    from matplotlib.figure import Figure

    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    steps = [e["step"] for e in entries]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(steps, [e["identity_gap"] for e in entries], marker="o")
    ax.axhline(0, color="grey", linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("shuffled - own held-out loss (nats)")
    ax.set_title("Persona-identity diagnostic during pretraining")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100, bbox_inches="tight")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/shakespeare-pretrain")
