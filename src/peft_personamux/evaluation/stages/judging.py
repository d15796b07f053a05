"""Evaluation stages ``judge`` (a second LM scores every generation and tries to catch it among real lines) and
``who_said_it`` (a classifier trained on the training lines names the persona of each generation)."""

from __future__ import annotations

import gc
import random

from tqdm.auto import tqdm

from ..data import tiny_model_texts
from ..judge import Judge
from ..loading import load_causal_lm
from ..metrics import WhoSaidIt, discrimination_context, generated_is_caught


class JudgeStages:
    """Mixed into `runner.Evaluation`: the stages ``judge`` and ``who_said_it``."""

    def discrimination_trials(self, persona: str) -> list[dict[str, list[str]]]:
        """Per generation prompt: real lines the judge reads first, and real candidates beside the generated one."""
        config = self.config
        train = [r["response"] for r in self.split.rows_of("train", persona)]
        test = [r["response"] for r in self.split.rows_of("test", persona)]
        trials = []
        for j in range(len(self.generation_rows(persona))):
            rng = random.Random(f"discrimination-{config.seed}-{persona}-{j}")
            context = rng.sample(train, config.discrimination_context_lines)
            pool = [line for i, line in enumerate(test) if i != j]  # not the real answer to the same prompt
            rng.shuffle(pool)
            spare = [line for line in train if line not in context]
            rng.shuffle(spare)
            trials.append({"context": context, "real": (pool + spare)[: config.discrimination_real_candidates]})
        return trials

    def judge_stage(self, generations: dict, partial: dict, save) -> dict:
        config = self.config
        texts = tiny_model_texts(self.split, config.instruction)
        model, tokenizer = load_causal_lm(
            config.judge_model, "judge", config.dtype, self.out / "models", texts, config.seed + 1
        )
        judge = Judge(model.to(self.device), tokenizer, config.judge_batch_size)
        trials = partial.get("trials") or {p: self.discrimination_trials(p) for p in self.personas}
        if "real" not in partial:
            pairs = [
                (discrimination_context(t["context"]), line)
                for p in self.personas
                for t in trials[p]
                for line in t["real"]
            ]
            scores = iter(judge.continuation_nll(pairs, progress=True))
            partial["real"] = {p: [[next(scores) for _ in t["real"]] for t in trials[p]] for p in self.personas}
            partial["trials"] = trials
            save(partial)
        methods = partial.setdefault("methods", {})
        for method, by_persona in tqdm(generations.items(), desc="judge: methods"):
            if method in methods:
                continue
            prompts, outputs, pairs = [], [], []
            for p in self.personas:
                for j, g in enumerate(by_persona[p]):
                    prompts.append(g["prompt"])
                    outputs.append(g["text"])
                    pairs.append((discrimination_context(trials[p][j]["context"]), g["text"]))
            losses = iter(judge.generation_loss(prompts, outputs))
            in_context = iter(judge.continuation_nll(pairs))
            entry: dict[str, dict] = {"generation_loss": {}, "candidate_nll": {}, "caught": {}}
            for p in self.personas:
                n = len(by_persona[p])
                entry["generation_loss"][p] = [next(losses) for _ in range(n)]
                entry["candidate_nll"][p] = [next(in_context) for _ in range(n)]
                entry["caught"][p] = [
                    generated_is_caught(partial["real"][p][j], entry["candidate_nll"][p][j]) for j in range(n)
                ]
            methods[method] = entry
            save(partial)
        del judge, model
        gc.collect()
        return partial

    def who_said_it_stage(self, generations: dict) -> dict:
        train = self.split.train
        classifier = WhoSaidIt(self.config.who_said_it_c, self.config.seed).fit(
            [r["response"] for r in train], [r["persona"] for r in train]
        )
        out = {}
        for method, by_persona in generations.items():
            texts = [g["text"] for p in self.personas for g in by_persona[p]]
            labels = [p for p in self.personas for _ in by_persona[p]]
            out[method] = classifier.accuracy_per_label(texts, labels)
        out["_all_test_lines"] = classifier.accuracy_per_label(
            [r["response"] for r in self.split.test], [r["persona"] for r in self.split.test]
        )
        return {"accuracy": out, "chance": 1.0 / len(self.personas)}
