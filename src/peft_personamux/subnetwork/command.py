"""What ``personamux add-persona --method subnetwork`` does: calibrate, score held-out lines, save the mask file."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from .calibrate import calibrate_subnetwork
from .channels import SubnetworkBank
from .config import Granularity, SubnetworkConfig
from .evaluate import plain_losses
from .files import subnetwork_path
from .weights import apply_weight_mask


def calibrate_and_save(
    model,
    tokenizer,
    name: str,
    train_rows: Sequence[dict],
    heldout_rows: Sequence[dict] | None,
    save_dir: str | os.PathLike,
    config: SubnetworkConfig,
    progress: bool = True,
) -> dict[str, Any]:
    """Calibrate ``name``'s mask on ``train_rows``, save it under ``save_dir/subnetworks/`` and return a summary.

    With ``heldout_rows`` the summary holds the held-out loss of the base model and of the masked model.
    """
    rows = [{**r, "persona": name} for r in train_rows]
    start = time.perf_counter()
    mask = calibrate_subnetwork(model, tokenizer, rows, name, config=config, progress=progress)
    result: dict[str, Any] = {"seconds": time.perf_counter() - start, "examples": len(rows), "bits": mask.num_bits}
    if heldout_rows:
        heldout = [{**r, "persona": name} for r in heldout_rows]
        result["loss_base"] = plain_losses(model, tokenizer, heldout)[name]
        if config.granularity == Granularity.WEIGHT:
            context = apply_weight_mask(model, mask)
        else:
            bank = SubnetworkBank(model)
            bank.add(mask)
            context = bank.apply(name)
        with context:
            result["loss_masked"] = plain_losses(model, tokenizer, heldout)[name]
        result["eval_examples"] = len(heldout)
    path = mask.save(subnetwork_path(save_dir, name, config.granularity.value))
    result["file"], result["bytes"] = path, os.path.getsize(path)
    return result
