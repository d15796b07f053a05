"""The run plan (what a run costs, counted before it starts) and the cache of finished stages."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
from pathlib import Path

from ..files import TEXT_PERSONAS_NAME, write_json
from .common import pm_methods
from .config import EvalConfig, is_stage_field
from .data import Split

STAGES_DIRNAME = "stages"
FINGERPRINT_NAME = "config_fingerprint.json"
_MISSING = object()
logger = logging.getLogger(__name__)


class StageCache:
    """Finished stages as ``stages/<name>.json``, beside a marker with the config they were made with. A stage stays
    valid while the fields its numbers depend on (`EvalConfig.stage_fields`) are unchanged: turning a stage on, or
    changing only another stage's own fields, keeps the finished ones."""

    def __init__(self, output_dir: Path, config: EvalConfig, overwrite: bool = False) -> None:
        self.directory = output_dir / STAGES_DIRNAME
        marker = self.directory / FINGERPRINT_NAME
        if overwrite:  # everything a run derived from its config; codebook/ is rebuilt by its stage when needed
            for derived in (self.directory, output_dir / "artifacts", output_dir / "models"):
                shutil.rmtree(derived, ignore_errors=True)
            (output_dir / TEXT_PERSONAS_NAME).unlink(missing_ok=True)
        elif marker.is_file():
            self._check(json.loads(marker.read_text(encoding="utf-8")), config, output_dir)
        write_json(marker, {"fingerprint": config.fingerprint(), "config": config.to_dict()}, indent=1)

    def names(self) -> list[str]:
        """The stages on disk, finished or partial."""
        return sorted(p.stem for p in self.directory.glob("*.json") if p.name != FINGERPRINT_NAME)

    def _check(self, marker: dict, config: EvalConfig, output_dir: Path) -> None:
        """Raise unless every stage on disk is valid for ``config``."""
        previous = marker.get("fingerprint")
        if previous == config.fingerprint() or not self.names():
            return
        before = _config_of(marker, output_dir)
        if before is None:
            raise ValueError(
                f"{self.directory} holds stages of another config (fingerprint {previous}, this one "
                f"{config.fingerprint()}). Pass --overwrite to discard them, or choose another --output_dir."
            )
        differing = {name: _differing(before.stage_fields(name), config.stage_fields(name)) for name in self.names()}
        stale = [name for name, fields in differing.items() if fields]
        if stale:
            changed = sorted({k for name in stale for k in differing[name]})
            message = f"{self.directory} holds stages made with other values of {', '.join(changed)}: "
            message += f"{', '.join(stale)}."
            if not all(is_stage_field(k) for k in changed):  # shared files (tiny models, text personas) differ too
                raise ValueError(f"{message} Pass --overwrite to discard them, or choose another --output_dir.")
            files = " ".join(str(self.directory / f"{name}.json") for name in stale)
            raise ValueError(
                f"{message} Delete them to recompute only those (`rm {files}`; the other stages are kept), pass "
                "--overwrite to discard every stage, or choose another --output_dir."
            )
        kept = ", ".join(self.names()) or "none"
        changed = ", ".join(_differing(before.fingerprinted_fields(), config.fingerprinted_fields()))
        logger.info("Changed %s: no finished stage depends on it; kept: %s.", changed, kept)

    def get(self, name: str) -> dict | None:
        path = self.directory / f"{name}.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def put(self, name: str, data: dict) -> None:
        write_json(self.directory / f"{name}.json", data, indent=1)


def _config_of(marker: dict, output_dir: Path) -> EvalConfig | None:
    """The config a stage cache was made with: the marker's own (written since stage fingerprints), or else the
    run's results.json, if either reproduces the marker's fingerprint."""
    candidates = [marker.get("config")]
    results = output_dir / "results.json"
    if results.is_file():
        with contextlib.suppress(ValueError, AttributeError):  # unreadable: as if absent
            candidates.append(json.loads(results.read_text(encoding="utf-8")).get("config"))
    for fields in candidates:
        if not isinstance(fields, dict):
            continue
        try:
            before = EvalConfig(**fields)
        except (TypeError, ValueError):  # a field this version no longer has, or a value it no longer accepts
            continue
        if before.fingerprint() == marker.get("fingerprint"):
            return before
    return None


def _differing(before: dict, after: dict) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k, _MISSING) != after.get(k, _MISSING))


def plan(config: EvalConfig, split: Split, pretrain_here: bool) -> dict[str, dict[str, int]]:
    """What a run costs, counted before it starts: example passes with backward (training) and forward-only
    (scoring) per stage, generations and judge sequences. Multiply by the seconds per pass of the machine."""
    c = config
    u, n, t = len(split.personas), len(split.train), len(split.test)
    g = sum(min(c.num_generations, len(split.rows_of("test", p))) for p in split.personas)
    scales = len(c.bias_scales)
    fisher = {"backward": c.fisher_steps * n + n, "forward": c.fisher_steps * n}  # a trial and a new gradient a step
    adam = {"backward": c.fit_steps * n, "forward": 0}
    random_fit = adam if c.random_codebook_method == "adam" else fisher
    stages = {
        "base_icl": {"backward": 0, "forward": 2 * t, "generations": 2 * g},
        "lora": {"backward": c.lora_steps * c.lora_batch_size, "forward": t, "generations": g},
        "sp": {"backward": c.sp_steps * n, "forward": 2 * t + n, "generations": g},
        "codebook": {
            "backward": int(c.codebook_epochs * len(split.pretrain)) if pretrain_here else 0,
            "forward": 0,
            "generations": 0,
        },
        "pm_zero": {"backward": 0, "forward": n + t, "generations": 0},
        "pm_adam": {**adam, "forward": adam["forward"] + n + scales * t, "generations": scales * g},
        "pm_fisher": {**fisher, "forward": fisher["forward"] + n + scales * t, "generations": scales * g},
        "random_codebook": {**random_fit, "forward": random_fit["forward"] + n + t, "generations": g},
    }
    if c.lbfgs_steps:  # each persona on its own, at most 1.25 loss evaluations (with gradient) per iteration
        lbfgs = math.ceil(1.25 * c.lbfgs_steps) * n
        stages["pm_lbfgs"] = {"backward": lbfgs, "forward": n + scales * t, "generations": scales * g}
    stages["pm_embedding"] = {"backward": 0, "forward": 2 * t, "generations": 0}  # + embedding lines, forward only
    if c.headroom or c.only_headroom:  # fits: at most 1.25 evaluations per L-BFGS iteration (the budget)
        evals = math.ceil(1.25 * c.headroom_steps) if c.headroom_method == "lbfgs" else c.headroom_steps + 1
        spans = 3 + int(c.headroom_zero_start) + int(c.headroom_gradient_personas > 0)
        identified = 1 + (int(c.headroom_gradient_personas > 0) + 1 if c.headroom_identify_all else 0)
        gradients = n * int(c.headroom_gradient_capture) + c.headroom_gradient_personas * c.headroom_gradient_lines
        stages["headroom"] = {
            "backward": spans * evals * n + gradients,
            "forward": (2 + spans) * (n + t) + identified * u * t,
            "generations": 0,
        }
    # per size: each configured fit and an SP fit on the first k lines of each; at every line (num_train) the rows
    # are the evaluation's own (pm_fisher, pm_lbfgs, random_codebook, sp), taken as they are
    sizes = [k for k in c.data_efficiency_sizes if k < c.num_train]
    if sizes and not c.only_headroom:
        lines = sum(k * u for k in sizes)
        costs = {"fisher": fisher, "lbfgs": {"backward": math.ceil(1.25 * c.lbfgs_steps) * n, "forward": 0}}
        costs["random"] = random_fit
        fits = [costs[f] for f in c.data_efficiency_fits]  # per line of the full split: scale by lines / n
        stages["data_efficiency"] = {
            "backward": lines * c.sp_steps + sum(math.ceil(f["backward"] * lines / n) for f in fits),
            "forward": sum(math.ceil(f["forward"] * lines / n) for f in fits) + (len(fits) + 1) * len(sizes) * t + t,
            "generations": 0,
        }
    sparsities = len(c.subnetwork_sparsities) if not c.only_headroom else 0
    if sparsities:  # calibration (train lines); per variant every persona's lines under every persona's mask
        stages["subnetwork"] = {
            "backward": 0,
            "forward": n + sparsities * 3 * u * t,
            "generations": sparsities * 3 * g,
        }
    methods = 4 + len(pm_methods(c)) * scales + 1 + 3 * sparsities + 1  # rows of the table and the real lines
    judge = {"backward": 0, "forward": 0, "generations": 0, "judge_sequences": 2 * methods * g}
    judge["judge_sequences"] += g * c.discrimination_real_candidates
    stages["judge"] = judge
    if c.only_headroom:
        stages = {k: v for k, v in stages.items() if k in ("codebook", "headroom")}
        judge = {"judge_sequences": 0}
    total = {k: sum(s.get(k, 0) for s in stages.values()) for k in ("backward", "forward", "generations")}
    total["judge_sequences"] = judge["judge_sequences"]
    total["personas"] = u
    return {**stages, "total": total}
