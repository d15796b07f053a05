"""Tables and plots of the headroom stage (`evaluation.headroom`)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..files import finite_or_none, write_json
from .headroom import FITTED, summarize_headroom
from .metrics import summarize

LABELS = {
    "zero": "zero mixture",
    "mean64": "mean pretraining mixture (unfitted)",
    "free8": "free 8 tokens",
    "mix64": "64 weights, learned codebook",
    "mix64_zero": "64 weights, learned codebook, from zero (the paper's start)",
    "random64": "64 weights, random codebook",
    "grad64": "64 weights, gradient codebook",
}


def headroom_markdown(result: dict) -> list[str]:
    """Tables of the headroom stage (summary, gradient capture, identification, per character)."""
    s = result["summary"]
    settings = result.get("settings", {})
    methods = [m for m in LABELS if m in s["test"]]
    fit = f"{settings.get('method', 'fisher')}, {settings.get('steps', '?')} iterations"
    start = s.get("start", "zero")
    lines = [
        f"{len(result['personas'])} unseen characters, {result['train_lines']} training and {result['test_lines']} "
        f"held-out lines in all; every persona fitted on its own ({fit}), from the prompt of `{start}` (the "
        "random and gradient codebooks get that prompt as one more code) except `mix64_zero`.",
        "",
        "| | loss, train | loss, held-out | held-out gain over zero | gain over the start, train | "
        "gain over the start, held-out | capture (held-out) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        over_zero = s["test"]["improvement"].get(m)
        gain = s["train"]["gain_over_start"].get(m), s["test"]["gain_over_start"].get(m)
        capture = s["test"]["capture_ratios"].get(m)
        lines.append(
            f"| {LABELS[m]} | {_ci(s['train'][m])} | {_ci(s['test'][m])} | {_dash(over_zero)} | {_dash(gain[0])} | "
            f"{_dash(gain[1])} | {'—' if capture is None else _num(capture)} |"
        )
    over = s["test"]["over_random"]
    lines += [
        "",
        f"Capture ratio = ({start} - method) / ({start} - free8), of the held-out means (train: "
        + ", ".join(f"{m} {_num(v)}" for m, v in s["train"]["capture_ratios"].items())
        + "). Gain over the start relative to the random codebook's, held-out: "
        + ", ".join(f"{m} {_num(v)}x" for m, v in over.items())
        + ".",
    ]
    capture = result.get("gradient_capture")
    if capture:
        lines += [
            "",
            f"Gradient capture: share of each character's prompt gradient at the start (`{start}`) inside a "
            "codebook's span "
            f"(a random span: {capture['random_expected']:.4f} expected).",
            "",
            "| codebook | raw | centred (the character's own part) |",
            "|---|---|---|",
        ]
        for label in ("mix64", "random64", "grad64"):
            if label in capture:
                lines.append(f"| {LABELS[label]} | {_ci(capture[label]['raw'])} | {_ci(capture[label]['centred'])} |")
    if "grad64_codebook" in result:
        g = result["grad64_codebook"]
        if g.get("method", "pca") == "contrast":
            made = (
                "the contrast codebook (top generalised eigenvectors of their split-half persona signal against the "
                f"lines' curvature), holding {100 * g['contrast_share']:.1f}% of the signal-to-curvature eigenvalues"
            )
        else:
            made = f"principal directions, holding {100 * g['explained_variance']:.1f}% of their centred variance"
        lines += [
            "",
            f"The gradient codebook, from {g['personas']} pretraining characters ({g['lines']} lines): {made}.",
        ]
    lines += quadratic_markdown(result)
    lines += [
        "",
        "Likelihood identification (held-out lines scored under every fitted character). The own-fit advantage is "
        "the held-out loss under the other characters' fits minus under the character's own: the part of a fit's "
        "gain that is particular to the character (a gain every character's fit gives is not persona):",
    ]
    for label in ("mix64", "random64", "grad64", "free8"):
        key = "identification" if label == "mix64" else f"identification_{label}"
        if key in result:
            i = result[key]
            advantage = summarize([g for g in i.get("own_mask_advantage") or [] if g is not None])
            lines.append(
                f"- {LABELS[label]}: accuracy {i['accuracy']:.3f} (chance {i['chance']:.3f}), own-fit advantage "
                f"{_ci(advantage)}"
            )
    shown = [m for m in ("zero", "mean64", *FITTED) if m in result]
    lines += [
        "",
        "Held-out loss per character, and the mix64 training curve (loss at each evaluation of the fit):",
        "",
        "| character | " + " | ".join(shown) + " | mix64 train curve |",
        "|---" * (len(shown) + 2) + "|",
    ]
    for p in result["personas"]:
        curve = _curve(result["mix64"]["curves"][p]) if "mix64" in result else "—"
        cells = " | ".join(f"{result[m]['test'][p]:.3f}" for m in shown)
        lines.append(f"| {p} | {cells} | {curve} |")
    return lines


def quadratic_markdown(result: dict) -> list[str]:
    """The quadratic model's predicted converged gains beside the fits' measured ones (empty without them)."""
    q = result.get("quadratic")
    if not q:
        return []
    s = result["summary"]
    damped = "capture_damped" in q  # runs from before the cross-validated damping have none
    labels = {"mix64": "mix64", "random64": "random64", q["grad64"]: "grad64", "free8": "free8"}
    lines = [
        "",
        f"Quadratic model (`peft_personamux.contrast`, curvature shrinkage {q['shrinkage']}): each span's converged "
        "gain over the start predicted from the prompt gradients at the start and the pretraining lines' curvature, "
        "beside the fits' measured gain. Every fitted number costs about 1 / (2 x training tokens) of held-out gain "
        "at convergence, so a span's held-out prediction can be below its training one by far.",
        "",
        "| span | predicted, train | predicted, held-out | signal | measured, train | measured, held-out |"
        + (" predicted, held-out, damped (CV) |" if damped else ""),
        "|---|---|---|---|---|---|" + ("---|" if damped else ""),
    ]
    for span in ("mix64", "random64", "pca64", "contrast64", "free8"):
        if span not in q:
            continue
        row = labels.get(span)
        measured = [s[split]["gain_over_start"].get(row) if row else None for split in ("train", "test")]
        name = f"{span} (fitted as grad64)" if row == "grad64" and span != "grad64" else span
        per = q[span]["train"]["per_persona"]
        # (train + held-out) / 2 = h.x / 2 for the converged step x: the held-out gain without line noise
        signal = summarize([(per[p] + q[span]["test"]["per_persona"][p]) / 2 for p in per])
        lines.append(
            f"| {name} | {_ci(q[span]['train'])} | {_ci(q[span]['test'])} | {_ci(signal)} | {_dash(measured[0])} | "
            f"{_dash(measured[1])} |" + (f" {_ci(q[span]['damped'])} |" if damped else "")
        )
    lines += [
        "",
        "Signal = (predicted train + predicted held-out) / 2: the held-out gain of the converged fit without line "
        "noise; free8's is the ceiling of any span under the model.",
    ]
    if damped:
        ratios = ", ".join(f"{span} {ratio:.2f}" for span, ratio in q["capture_damped"].items())
        lines += [
            "",
            "Damped (CV): each fit stopped early by a ridge on its prompt's change, `lambda / 2 * |x|^2`, lambda "
            f"picked by {q['folds']}-fold cross-validation on the character's own training lines (no held-out "
            "line), as `fit_mixtures(prompt_penalty=...)` fits it. A converged free prompt overfits 100 lines; a "
            "damped one is the ceiling that generalises. Capture ratio of the damped held-out gains over free8's: "
            f"{ratios}.",
        ]
    return lines


def write_headroom_outputs(headroom: dict, output_dir: str | Path, command: str) -> dict:
    """headroom.json, headroom.md (its tables), headroom_curves.png and identification.png in ``output_dir``.

    ``headroom`` may be an unfinished stage (``stages/headroom.json`` of an interrupted run): its finished rows are
    summarised and written, and the report names the rows still missing or in progress.
    """
    output_dir = Path(output_dir)
    headroom = dict(headroom)
    unfinished = sorted(k[: -len("_in_progress")] for k in headroom if k.endswith("_in_progress"))
    if "summary" not in headroom:
        headroom["summary"] = summarize_headroom(headroom)
    headroom = finite_or_none(headroom)
    write_json(output_dir / "headroom.json", headroom, indent=1)
    if any(m in headroom for m in FITTED):
        plot_headroom(headroom, output_dir / "headroom_curves.png")
    if "identification" in headroom:
        plot_identification(headroom, output_dir / "identification.png")
    lines = ["# Headroom", "", f"Command: `{command}`", ""]
    if not headroom.get("done", True):
        done = {k: len(headroom[f"{k}_in_progress"]["curves"]) for k in unfinished}
        lines += [
            "**Partial: the stage had not finished.** Rows in progress (characters fitted so far, not scored): "
            + (", ".join(f"{k} ({n})" for k, n in done.items()) or "none")
            + ".",
            "",
        ]
    lines += headroom_markdown(headroom)
    (output_dir / "headroom.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return headroom


def plot_headroom(result: dict, path: str | Path) -> str:
    """Training-loss curves of every fit (one panel per method, one line per character)."""
    from matplotlib.figure import Figure

    methods = [m for m in FITTED if m in result]
    fig = Figure(figsize=(3.5 * len(methods), 3.5))
    axes = fig.subplots(1, len(methods), sharey=False, squeeze=False)[0]  # one panel also comes as a list
    for ax, method in zip(axes, methods):
        for p, curve in result[method]["curves"].items():
            zero = curve[0]
            ax.plot(range(len(curve)), [v - zero for v in curve], marker=".", linewidth=1, label=p.split("/")[-1])
        ax.set_title(method)
        ax.set_xlabel("loss evaluation")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss - its start (nats)")
    axes[-1].legend(fontsize=6, ncol=2)
    fig.suptitle("Headroom fits: training loss at each evaluation")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return str(path)


def plot_identification(result: dict, path: str | Path) -> str:
    """Confusion matrix of likelihood identification: row = true character, column = mixture it was scored under."""
    from matplotlib.figure import Figure

    ident, personas = result["identification"], result["personas"]
    matrix = torch.tensor(ident["loss_matrix"])  # (true, candidate)
    relative = matrix - matrix.min(dim=1, keepdim=True).values  # 0 at each row's best candidate
    names = [p.split("/")[-1] for p in personas]
    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    image = ax.imshow(relative.numpy(), cmap="viridis_r")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("scored under the fitted mixture of")
    ax.set_ylabel("held-out lines of")
    ax.set_title(f"Likelihood identification: accuracy {ident['accuracy']:.2f} (chance {ident['chance']:.2f})")
    fig.colorbar(image, ax=ax, label="loss above the row's best (nats)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return str(path)


def _curve(curve: list[float]) -> str:
    if len(curve) > 8:
        curve = [*curve[:3], min(curve), curve[-1]]
        return f"{curve[0]:.3f} → {curve[1]:.3f} → {curve[2]:.3f} … best {curve[3]:.3f}, last {curve[4]:.3f}"
    return " → ".join(f"{v:.3f}" for v in curve)


def _dash(summary: dict | None) -> str:
    return "—" if summary is None else _ci(summary)


def _ci(summary: dict | None) -> str:
    if not summary or summary["mean"] is None:
        return "n/a"
    if summary["ci95"] is None:
        return f"{summary['mean']:.3f}"
    return f"{summary['mean']:.3f} ± {summary['ci95']:.3f}"


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"
