"""Smoke test of benchmarks/subnetwork.py: ``--tiny`` writes its JSON and table with every variant and ratio."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_subnetwork_benchmark_tiny(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    threads = torch.get_num_threads()
    try:
        spec = importlib.util.spec_from_file_location("benchmark_subnetwork", BENCHMARKS / "subnetwork.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.main(["--tiny", "--output-dir", str(tmp_path), "--repeats", "1", "--personas", "2"])
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop("_common", None)
    payload = json.loads((tmp_path / "subnetwork.json").read_text())
    assert {"benchmark", "command", "model", "hardware", "settings", "calibration", "results", "ratios"} <= set(
        payload
    )
    assert payload["hardware"]["cpu"] and payload["weight_mask_switch"]["restore_exact"] is True
    assert set(payload["results"]) == {
        "base",
        "channel_mixed",
        "channel_single",
        "personamux_mixed",
        "personamux+channel_mixed",
    }
    assert all(v > 0 for v in payload["ratios"].values())
    assert "Generation throughput" in (tmp_path / "subnetwork.md").read_text()
