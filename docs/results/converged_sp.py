"""The paper's SP baseline fitted further: an 8-token soft prompt per character, no bias tokens, L-BFGS in rounds.

The 100-line evaluation's SP row (6 full-batch Adam steps at lr 0.01, the config's budget) was still falling about
0.08 nats per step when it stopped, so "Persona-Mux is at or below SP" says little about SP itself. This script fits
the same prompts further: each unseen character's 8 free tokens (the identity codebook at bias scale 0, so the bias
tokens are removed and the prompt goes first, where peft's prompt tuning puts it) start where the run's SP started
(8 random vocabulary embeddings, seed ``config.seed + crc32(name)``), then take ``--rounds`` rounds of L-BFGS
(float32, full batch of its 100 training lines), each ``--steps`` iterations or ``ceil(1.25 * steps)`` loss
evaluations, whichever ends first (`fitting.fit_mixtures`); L-BFGS's memory restarts each round. After each round the
training and held-out lines are scored exactly, so the report gives both the last round and the best round on
held-out lines (a stop chosen on the test lines: the most SP could get from early stopping), and how much the last
round still lowered the training loss: whether the fits converged is read there, not assumed. It pairs them with the
run's rows, character by character (`metrics.paired_difference`), and reports how far the start's held-out loss is
from the run's SP before fitting (the same lines, the same prompt through another code path).

Run from the repository root (every third character first; on 2 CPU cores about 9 minutes per round per character;
resumable: each finished round is saved in eval_span_scaling/converged_sp.json, its prompt in
eval_span_scaling/converged_sp/; a resumed run must use the same --steps and --config):

    python docs/results/converged_sp.py --personas every_third --rounds 4
    python docs/results/converged_sp.py --personas all --rounds 4   # the rest; docs/results.md's run stopped after one
    python docs/results/converged_sp.py --report_only

Writes docs/results/converged_sp.{md,json} (and a copy of the state, docs/results/converged_sp_state.json).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from evaluation_partial import finished_rows
from peft import PeftModel
from tqdm.auto import tqdm

from peft_personamux.collator import PersonaMuxCollator
from peft_personamux.evaluation.config import EvalConfig, read_config_file
from peft_personamux.evaluation.headroom import HeadroomSettings, free_prompt_model, row_losses
from peft_personamux.evaluation.methods import SoftPrompts, sp_start
from peft_personamux.evaluation.metrics import paired_difference, summarize
from peft_personamux.evaluation.report import summary_cell
from peft_personamux.evaluation.runner import Evaluation
from peft_personamux.fitting import fit_mixtures

OUT = Path("docs/results")
STATE = Path("eval_span_scaling/converged_sp.json")
PROMPTS = Path("eval_span_scaling/converged_sp")
SHIPPED = Path("src/peft_personamux/pretrained/shakespeare")  # only its placeholder id and shape: bias scale 0
RUN = Path("docs/results/core100")  # the 100-line evaluation whose rows this pairs with
PAIR_LABELS = {
    "lbfgs-sp_last": "Persona-Mux (L-BFGS from the mean) − SP, last round",
    "lbfgs-sp_best": "Persona-Mux (L-BFGS from the mean) − SP, best round",
    "zero-sp_last": "zero mixture − SP, last round",
    "zero-sp_best": "zero mixture − SP, best round",
    "sp_last-sp": "SP, last round − the run's SP",
}
COMPARE = {"sp": "the run's SP (6 Adam steps)", "zero": "zero mixture", "lbfgs": "Persona-Mux, L-BFGS from the mean"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/eval_core100.json")
    parser.add_argument("--personas", choices=("all", "every_third"), default="all")
    parser.add_argument("--rounds", type=int, default=2, help="Rounds of L-BFGS, scored after each.")
    parser.add_argument(
        "--steps", type=int, default=10, help="L-BFGS iterations per round (at most 1.25x as many loss evaluations)."
    )
    parser.add_argument("--report_only", action="store_true", help="Write the report from the rounds saved so far.")
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1:
        raise SystemExit(f"--rounds and --steps must be >= 1, got {args.rounds} and {args.steps}.")
    state = json.loads(STATE.read_text()) if STATE.is_file() else {"personas": {}}
    if args.report_only:
        return write_report(state)
    if state.get("config", args.config) != args.config or state.get("steps", args.steps) != args.steps:
        raise SystemExit(
            f"{STATE} holds rounds of --config {state['config']} --steps {state['steps']}: resume with those, or move "
            "it away to start over."
        )
    config = EvalConfig(**read_config_file(args.config))
    evaluation = Evaluation(config)
    unseen = list(evaluation.personas)
    run_rows, _ = finished_rows(RUN / "stages")
    if sorted(unseen) != sorted(run_rows["sp"]):
        raise SystemExit(f"{args.config} splits other characters than {RUN}: {unseen}")
    personas = unseen[::3] + ([p for p in unseen if p not in unseen[::3]] if args.personas == "all" else [])
    state["config"], state["steps"] = args.config, args.steps
    base, tokenizer = evaluation.base()
    shipped = PeftModel.from_pretrained(copy.deepcopy(base), str(SHIPPED))
    tokens = shipped.peft_config[shipped.active_adapter].tokens_per_code
    model = free_prompt_model(base, shipped, tokens)  # mixture (tokens * hidden,) = the prompt, flattened
    del shipped
    model.add_personas(personas, exist_ok=True)
    exact = dataclasses.replace(HeadroomSettings.from_config(config).fit_options, autocast_dtype=None)  # float32
    chunk = config.fit_chunk_size
    collate = PersonaMuxCollator.for_model(model, tokenizer, **evaluation.mux_collator_kwargs())
    embeddings = base.get_input_embeddings().weight  # (vocab, hidden)
    PROMPTS.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        STATE.write_text(json.dumps(state, indent=1) + "\n")

    def score(batch: dict) -> float:
        nll, count = row_losses(model, batch, chunk, bias_scale=0.0)
        return float(nll.sum() / count.sum())

    for name in tqdm(personas, desc="converged SP"):
        record = state["personas"].setdefault(name, {"rounds": []})
        if len(record["rounds"]) >= args.rounds:
            continue
        train = collate(evaluation.split.rows_of("train", name))
        test = collate(evaluation.split.rows_of("test", name))
        row = model.persona_index(name)
        train["persona_ids"] = torch.full_like(train["persona_ids"], row)
        test["persona_ids"] = torch.full_like(test["persona_ids"], row)
        if record["rounds"]:
            model.set_mixture(name, torch.load(prompt_file(name, len(record["rounds"]))))
        else:  # the run's SP start: the same draw with the same seed
            start_prompt = sp_start(embeddings, tokens, SoftPrompts.seed_for(config, name), config.sp_init)
            model.set_mixture(name, start_prompt.flatten())  # (tokens * hidden,)
            record["start"] = {"train": score(train), "test": score(test)}
            save()
        while len(record["rounds"]) < args.rounds:
            start = time.perf_counter()
            out = fit_mixtures(
                model, train, method="lbfgs", steps=args.steps, chunk_size=chunk, bias_scale=0.0, options=exact
            )
            finished = {
                "curve": out.persona_curves[row],  # the loss at every evaluation, line-search trials included
                "evaluations": out.example_passes // len(train["input_ids"]),
                "seconds": time.perf_counter() - start,
                "train": score(train),
                "test": score(test),
            }
            # the prompt first, then the record: a run stopped in between redoes the round
            prompt = model.get_mixture(name).detach().float().clone()  # (tokens * hidden,)
            torch.save(prompt, prompt_file(name, len(record["rounds"]) + 1))
            record["rounds"].append(finished)
            save()
    write_report(state)


def prompt_file(name: str, round_number: int) -> Path:
    """Where a character's prompt after a round is kept."""
    return PROMPTS / f"{name.replace('/', '__')}.round{round_number}.pt"


def write_report(state: dict) -> None:
    run_rows, _ = finished_rows(RUN / "stages")
    rounds = max((len(r["rounds"]) for r in state["personas"].values()), default=0)
    if not rounds:
        raise SystemExit(f"No finished rounds in {STATE}.")
    done = {p: r for p, r in state["personas"].items() if len(r["rounds"]) == rounds}  # the characters with them all
    personas = sorted(done)
    partly = {p: len(r["rounds"]) for p, r in state["personas"].items() if 0 < len(r["rounds"]) < rounds}
    last = {p: done[p]["rounds"][-1]["test"] for p in personas}
    best = {p: min(r["test"] for r in done[p]["rounds"]) for p in personas}
    start = {p: done[p]["start"]["test"] for p in personas}
    run_sp = json.loads((RUN / "stages" / "sp.json").read_text())["personas"]
    run_lbfgs = json.loads((RUN / "stages" / "pm_lbfgs.json").read_text())
    start_gap = max(abs(start[p] - run_sp[p]["test_loss_before"]) for p in personas)
    rows = {"sp_start": start, "sp_last": last, "sp_best": best}
    result = {
        "command": "python docs/results/converged_sp.py --report_only",  # the fits' commands: the module docstring
        "personas": personas,
        "rounds": rounds,
        "steps_per_round": state["steps"],
        "left_out": partly,  # characters with fewer rounds: name -> rounds
        "evaluations_by_round": [
            summarize([done[p]["rounds"][i]["evaluations"] for p in personas]) for i in range(rounds)
        ],
        "start_vs_run_sp_before": start_gap,
        "heldout": {k: summarize(list(v.values())) for k, v in rows.items()}
        | {k: summarize([run_rows[k][p] for p in personas]) for k in COMPARE},
        "train_by_round": [summarize([done[p]["rounds"][i]["train"] for p in personas]) for i in range(rounds)],
        "test_by_round": [summarize([done[p]["rounds"][i]["test"] for p in personas]) for i in range(rounds)],
        "train_drop_by_round": [  # the exact training loss's fall over each round (the first: from the start)
            summarize(
                [
                    (done[p]["rounds"][i - 1]["train"] if i else done[p]["start"]["train"])
                    - done[p]["rounds"][i]["train"]
                    for p in personas
                ]
            )
            for i in range(rounds)
        ],
        "lbfgs_train": summarize([run_lbfgs["train_loss_after"][p] for p in personas]),
        "seconds": sum(r["seconds"] for p in personas for r in done[p]["rounds"]),
        "paired": {
            f"{reference}-{sp}": paired_difference(run_rows[reference], rows[sp], personas)
            for reference in ("lbfgs", "zero")
            for sp in ("sp_last", "sp_best")
        }
        | {"sp_last-sp": paired_difference(last, run_rows["sp"], personas)},
        "per_persona": {
            p: {"start": start[p], "rounds": done[p]["rounds"], **{k: run_rows[k][p] for k in COMPARE}}
            for p in personas
        },
    }
    (OUT / "converged_sp.json").write_text(json.dumps(result, indent=1) + "\n")
    shutil.copyfile(STATE, OUT / "converged_sp_state.json")
    write_markdown(result)


def write_markdown(result: dict) -> None:
    held = result["heldout"]
    lines = [
        "# SP fitted further (no bias tokens), against the 100-line evaluation's rows",
        "",
        f"`{result['command']}`; {len(result['personas'])} unseen characters, {result['rounds']} rounds of L-BFGS "
        f"each (--steps {result['steps_per_round']}: that many iterations or 1.25x as many loss evaluations, "
        f"whichever ends first; float32, full batch of 100 training lines), {result['seconds'] / 60:.0f} minutes of "
        "fitting. The start is the run's SP start (8 random vocabulary embeddings, the run's seeds).",
    ]
    if result["left_out"]:
        lines.append(
            "Left out, with fewer rounds: "
            + ", ".join(f"{name} ({n})" for name, n in sorted(result["left_out"].items()))
            + "."
        )
    lines += [
        "",
        "## Held-out loss (mean ± 95% CI over these characters)",
        "",
        "| row | held-out loss |",
        "|---|---|",
        f"| SP start (vocabulary embeddings) | {summary_cell(held['sp_start'])} |",
        f"| {COMPARE['sp']} | {summary_cell(held['sp'])} |",
        f"| SP, last round | {summary_cell(held['sp_last'])} |",
        f"| SP, best round on the held-out lines | {summary_cell(held['sp_best'])} |",
        f"| {COMPARE['zero']} | {summary_cell(held['zero'])} |",
        f"| {COMPARE['lbfgs']} | {summary_cell(held['lbfgs'])} |",
        "",
        "## By round (mean over these characters)",
        "",
        "| round | loss evaluations | train | held out | training loss drop over the round |",
        "|---|---|---|---|---|",
        *(
            f"| {i + 1} | {ev['mean']:.1f} | {tr['mean']:.3f} | {te['mean']:.3f} | {summary_cell(drop)} |"
            for i, (ev, tr, te, drop) in enumerate(
                zip(
                    result["evaluations_by_round"],
                    result["train_by_round"],
                    result["test_by_round"],
                    result["train_drop_by_round"],
                )
            )
        ),
        "",
        f"The run's Persona-Mux L-BFGS fit ends at training loss {result['lbfgs_train']['mean']:.3f} on these "
        "characters.",
        "",
        "## Paired by character (first minus second, mean ± 95% CI, first lower on k characters)",
        "",
        "| difference | mean ± CI | first lower on |",
        "|---|---|---|",
        *(
            f"| {PAIR_LABELS[key]} | {summary_cell(d)} | {d['lower']} of {d['n']} |"
            for key, d in result["paired"].items()
        ),
        "",
        "The start's held-out loss against the run's SP before its first step (peft prompt tuning, the same lines): "
        f"largest gap over characters {result['start_vs_run_sp_before']:.2e} nats.",
    ]
    (OUT / "converged_sp.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
