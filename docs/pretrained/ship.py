"""Copy a finished `personamux pretrain` run into docs/pretrained/stage1_codebook, and its logs into docs/.

The stage-1 codebook is what docs/pretrained/compute_codebook.py turns into the shipped one (its start prompt and bias
tokens; docs/pretrained_codebook.md).

    python docs/pretrained/ship.py runs/shakespeare-pretrain
    python docs/pretrained/ship.py runs/shakespeare-pretrain --checkpoint 1000 --info OTHER/personamux_pretrain.json

The adapter's base_model_name_or_path becomes the `smollm2-135m-instruct` sentinel (not this machine's path).
``--checkpoint N`` ships the weights of ``RUN/checkpoint-N`` instead of the finished run's (an interim copy while a
long run goes on); ``personamux_pretrain.json`` is written only when the run ends, so it then comes from ``--info``,
which must describe the same data split and prompt format.
"""

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAGE1 = ROOT / "docs" / "pretrained" / "stage1_codebook"
DOCS = ROOT / "docs" / "pretrained"


def main(run: str, checkpoint: int | None = None, info: str | None = None) -> None:
    run_dir = Path(run)
    weights_dir = run_dir if checkpoint is None else run_dir / f"checkpoint-{checkpoint}"
    info_file = Path(info) if info else run_dir / "personamux_pretrain.json"
    needed = [weights_dir / n for n in ("adapter_config.json", "adapter_model.safetensors", "personas")] + [info_file]
    for path in needed:
        if not path.exists():
            raise SystemExit(f"{path} is missing: is the run finished (or pass --checkpoint and --info)?")
    info_text = info_file.read_text()  # read before the stage-1 directory (which may hold info_file) is replaced
    shutil.rmtree(STAGE1, ignore_errors=True)
    STAGE1.mkdir(parents=True)
    shutil.copytree(weights_dir / "personas", STAGE1 / "personas")
    shutil.copy2(weights_dir / "adapter_model.safetensors", STAGE1)
    (STAGE1 / "personamux_pretrain.json").write_text(info_text)
    config = json.loads((weights_dir / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "smollm2-135m-instruct"
    (STAGE1 / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for name in ("loss_log.jsonl", "loss_curve.png", "identity_log.jsonl"):
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, DOCS / name)
    identity = run_dir / "identity_log.jsonl"
    if identity.exists():
        plot_identity(identity, DOCS / "identity_gap.png")
    print(f"Copied {len(list((STAGE1 / 'personas').rglob('*.safetensors')))} personas to {STAGE1}.")


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default="runs/shakespeare-pretrain", help="the pretraining output_dir")
    parser.add_argument("--checkpoint", type=int, help="ship RUN/checkpoint-N's weights (run not finished)")
    parser.add_argument("--info", help="personamux_pretrain.json to ship (default: RUN's, written at the end)")
    args = parser.parse_args()
    main(args.run, args.checkpoint, args.info)
