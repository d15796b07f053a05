"""Smoke tests of the benchmark scripts: each runs with ``--tiny`` into a temp folder and writes its JSON and table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from peft_personamux.machine import MATRIX_FLAGS

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# script -> top-level JSON keys it must write
EXPECTED_KEYS = {
    "fit_speed": {"methods", "ratios", "targets", "personas", "codebook"},
    "throughput": {"results", "ratios", "targets"},
    "switch_and_size": {"results", "ratios"},
}
COMMON_KEYS = {"benchmark", "command", "model", "hardware", "settings"}


@pytest.fixture
def load_script(monkeypatch):
    """Import benchmarks/<name>.py as a module (its sibling `_common` importable), keeping torch's thread count."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    threads = torch.get_num_threads()

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    yield load
    torch.set_num_threads(threads)
    sys.modules.pop("_common", None)


def check_outputs(name: str, out: Path, payload: dict) -> dict:
    data = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
    assert COMMON_KEYS | EXPECTED_KEYS[name] <= set(data)
    assert data["benchmark"] == name
    assert data["command"].startswith("python ") and f"{name}.py --tiny" in data["command"]
    assert {"cpu", "cpu_cores", "cpu_features", "torch", "torch_threads", "dtype"} <= set(data["hardware"])
    assert set(data["hardware"]["cpu_features"]) <= set(MATRIX_FLAGS)  # what decides float32 vs bf16 speed
    assert data == json.loads(json.dumps(payload, default=str))  # main() returns what it wrote
    md = (out / f"{name}.md").read_text(encoding="utf-8")
    assert "|---|" in md and data["command"] in md and "torch" in md
    return data


def test_fit_speed_tiny(load_script, tmp_path):
    payload = load_script("fit_speed").main(["--tiny", "--adam-steps", "20", "--output-dir", str(tmp_path)])
    data = check_outputs("fit_speed", tmp_path, payload)
    assert set(data["methods"]) == {"adam", "fisher"}
    assert {"time_adam_over_fisher", "passes_adam_over_fisher", "heldout_fisher_over_adam"} == set(data["ratios"])
    for method in data["methods"].values():
        assert method["seconds_total"] > 0 and method["example_passes_per_persona"] > 0
        assert method["heldout_after_mean"] < method["heldout_before_mean"]  # both recipes learn the pattern
    assert data["methods"]["adam"]["example_passes_per_persona"] == 20 * 8  # 20 full-batch steps over 8 lines
    assert len(data["personas"]) == 2 and data["codebook"]["source"] == "random"


# small settings for the --random-llama-8b code path (timings only, synthetic data) on a CPU
RANDOM_8B_ARGS = {
    "fit_speed": ["--train-lines", "4", "--test-lines", "2", "--seq-len", "24", "--adam-steps", "2"],
    "throughput": ["--rows", "4", "--max-new-tokens", "2", "--prompt-tokens", "8", "--repeats", "1"],
    "switch_and_size": ["--loads", "2", "--switches", "10", "--warmup", "1"],
}


@pytest.mark.parametrize("name", sorted(RANDOM_8B_ARGS))
def test_random_llama_8b_path(load_script, tmp_path, monkeypatch, name):
    """What runs on a GPU with --random-llama-8b --dtype bfloat16, with the 8B config shrunken to run on a CPU."""
    from transformers import LlamaConfig

    script = load_script(name)
    small = LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=255, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    monkeypatch.setattr(script._common, "llama_8b_config", lambda: small)
    argv = ["--random-llama-8b", "--dtype", "bfloat16", "--threads", "1", "--output-dir", str(tmp_path)]
    payload = script.main([*argv, *RANDOM_8B_ARGS[name]])
    assert payload["hardware"]["dtype"] == "bfloat16" and "random Llama, 8B shapes" in payload["model"]
    assert (tmp_path / f"{name}.md").is_file()


def test_llama_8b_config_has_8b_parameters():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import _common
    finally:
        sys.path.remove(str(BENCHMARKS))
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(_common.llama_8b_config())
    assert 8.0e9 < _common.num_parameters(model) < 8.1e9  # Llama-3-8B: 8.03B


def test_throughput_tiny(load_script, tmp_path):
    payload = load_script("throughput").main(["--tiny", "--rows", "8", "--output-dir", str(tmp_path)])
    data = check_outputs("throughput", tmp_path, payload)
    assert set(data["results"]) == {"base", "personamux", "lora_mixed", "lora_single"}
    assert data["results"]["base"]["ratio_vs_base"] == 1.0
    assert all(r["new_tokens_per_s"] > 0 for r in data["results"].values())
    assert set(data["ratios"]) == {"personamux", "lora_mixed", "lora_single"}
    mux = data["results"]["personamux"]["prefill_tokens_per_row"]
    assert mux == data["results"]["base"]["prefill_tokens_per_row"] + data["settings"]["personamux_virtual_tokens"]


def test_switch_and_size_tiny(load_script, tmp_path):
    payload = load_script("switch_and_size").main(["--tiny", "--loads", "4", "--output-dir", str(tmp_path)])
    data = check_outputs("switch_and_size", tmp_path, payload)
    assert set(data["results"]) == {"personamux", "prompt_tuning", "lora"}
    for result in data["results"].values():
        assert result["per_persona_bytes"] > 0 and result["load_and_switch_seconds"] > 0
    # 64 float32 mixture weights plus metadata, against 8 virtual tokens x hidden 32 floats for prompt tuning
    assert data["results"]["personamux"]["per_persona_bytes"] < 1024
    assert data["ratios"]["prompt_tuning"]["bytes_vs_personamux"] > 1


def test_trainer_speed_parses_the_trainer_summary_and_builds_both_sides(load_script, tmp_path):
    """The end-to-end benchmark reads the Trainer's own summary line and runs the same rows on both code trees."""
    module = load_script("trainer_speed")
    line = "{'train_runtime': '63.8', 'train_samples_per_second': '0.752', 'train_steps_per_second': '0.094', "
    line += "'train_loss': '5.273', 'epoch': '0.75'}"
    assert module.RUNTIME.findall(line) == [("63.8", "0.752", "5.273")]
    args = module.argparse.Namespace(
        model=None, personas=4, lines=2, batch_size=4, steps=2, persona="x/y", fit_lines=8, fit_steps=2
    )
    stages = module.commands(args, tmp_path)
    earlier, current = stages["stage 1 (pretrain)"]
    assert current[: len(earlier)] == earlier and "--length_grouped" in current  # same rows, current flags added
    earlier, current = stages["stage 2 (add-persona, Adam)"]
    assert earlier == current and earlier[earlier.index("--fit_method") + 1] == "adam"
    with pytest.raises(SystemExit, match="must be positive"):
        module.main(["--steps", "0"])


def test_count_flops_counts_forward_and_the_input_gradient_only():
    """A frozen (k -> n) projection of m rows: 2mkn forward, 2mkn for the input's gradient, none for the weight."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import _common
    finally:
        sys.path.remove(str(BENCHMARKS))
    m, k, n = 6, 5, 7
    layer = torch.nn.Linear(k, n, bias=False).requires_grad_(False)
    x = torch.randn(m, k, requires_grad=True)
    assert _common.count_flops(lambda: layer(x).sum().backward()) == 4 * m * k * n
    layer.requires_grad_(True)
    assert _common.count_flops(lambda: layer(x).sum().backward()) == 6 * m * k * n
    # torch's CPU attention kernel counts like its eager form
    q, k_, v = (torch.randn(1, 2, 5, 4, requires_grad=True) for _ in range(3))
    fused = _common.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k_, v).sum().backward())
    eager = _common.count_flops(lambda: (torch.softmax(q @ k_.transpose(-1, -2), -1) @ v).sum().backward())
    assert fused == eager == 3 * 4 * (1 * 2 * 5 * 5 * 4)  # two products forward, four backward


def test_matmul_rates_tiny(load_script, tmp_path):
    payload = load_script("matmul_rates").main(
        ["--tiny", "--rounds", "3", "--repeats", "2", "--output-dir", str(tmp_path)]
    )
    (record,) = payload["results"]
    for dtype in ("float32", "bf16"):
        rounds = record[dtype]["rounds"]
        assert len(rounds) == 3 and all(r > 0 for r in rounds)
        assert record[dtype]["best"] == max(rounds) and record[dtype]["first"] == rounds[0]
    assert record["bf16_over_float32"]["best"] == record["bf16"]["best"] / record["float32"]["best"]
    assert COMMON_KEYS <= set(json.loads((tmp_path / "matmul_rates.json").read_text()))
    assert "bf16 / float32" in (tmp_path / "matmul_rates.md").read_text()


def test_train_speed_ceiling_is_the_counted_flops_at_the_measured_rate(load_script):
    """The roofline columns: achieved FLOP/s, its share of the dtype's rate, and the speed at that rate, vs plain."""
    module = load_script("train_speed")

    def variant(name, seconds, flops, bf16):
        v = module.Variant(name, [{"input_ids": torch.zeros(4, 10)}], module.PLAIN)
        v.seconds, v.flops, v.bf16, v.loss = [seconds, 2 * seconds], flops, bf16, 1.0
        return v

    plain, fast = variant("plain", 2.0, 8e9, False), variant("fast", 0.5, 4e9, True)
    _, records = module.table([plain, fast], {"float32": 1e10, "bfloat16": 4e10})
    assert [r["ratio"] for r in records] == [1.0, 4.0]  # 4 rows in 2 s vs in 0.5 s (fastest of the repeats)
    assert records[0]["share_of_matmul_rate"] == pytest.approx(0.4)  # 8 GFLOP in 2 s at 10 GFLOP/s
    assert records[1]["share_of_matmul_rate"] == pytest.approx(0.2)  # 4 GFLOP in 0.5 s at 40 GFLOP/s
    assert records[1]["ceiling_passes_per_second"] == pytest.approx(40.0)  # 4 rows, 4 GFLOP at 40 GFLOP/s
    assert records[1]["ceiling_ratio"] == pytest.approx(20.0)  # 40 passes/s over plain's 2
    assert module.highest_ceiling(records) == "20.00x (fast)"


def test_train_profile_groups_self_time_by_operator_kind(load_script):
    """Shares of the profiled aten time: each operator in its group, the groups summing to 1, the top ranked."""
    module = load_script("train_profile")
    times = {"aten::mm": 50.0, "aten::bmm": 10.0, "aten::copy_": 20.0, "aten::_softmax": 5.0, "aten::mul": 15.0}
    groups, top = module.summary(times, top=2)
    assert groups["matrix multiplies"] == pytest.approx(0.6)
    assert groups["casts and copies"] == pytest.approx(0.2)
    assert groups["attention (softmax, fused SDPA kernels)"] == pytest.approx(0.05)
    assert groups[module.OTHER] == pytest.approx(0.15)
    assert sum(groups.values()) == pytest.approx(1.0)
    assert top == [("aten::mm", 0.5), ("aten::copy_", 0.2)]


def test_busy_is_judged_by_the_load_before_the_run(load_script, monkeypatch):
    """The benchmark's own threads load the cores: a report read at the end must not call its own run busy."""
    import argparse
    import os

    common = load_script("_common")
    cores = os.cpu_count() or 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    args = argparse.Namespace(tiny=True, random_llama_8b=False, model=None, threads=None, seed=0, device="cpu")
    common.setup(args)
    monkeypatch.setattr(os, "getloadavg", lambda: (float(cores), 0.0, 0.0))  # the run itself, at the end
    assert "load_average_1min" not in common.hardware("cpu")
    common.setup(args)  # busy before the run: flagged
    assert common.hardware("cpu")["load_average_1min"] == float(cores)


def test_train_speed_workers_split_batches_and_add_the_same_gradients(load_script):
    """'N Python threads x 1 thread' runs the batches round-robin on threads: same loss, same summed gradients."""
    from tiny_models import batch_for, mux

    from peft_personamux.loss import FAST

    script = load_script("train_speed")
    model = mux()
    model.train_personas(["a", "b", "c"])
    batches = [batch_for(model), batch_for(model, with_prefix=(True, False, True, True)), batch_for(model)]
    results = []
    for workers in (1, 2):
        variant = script.Variant("v", batches, FAST, threads=1, workers=workers)
        model.zero_grad(set_to_none=True)
        if workers == 1:  # one thread accumulates over every batch, as the threads do together
            total, tokens = variant._run_batches(model, batches, zero=False)
            loss = total / tokens
        else:
            variant.run(model)
            loss = variant.loss
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad and p.grad is not None]
        results.append((loss, grads))
    threaded = script.Variant("v", batches, FAST, threads=1, workers=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threaded.count(model)  # the FLOP counter sees one thread: the same batches are counted on the calling one
        assert torch.get_num_threads() == 2  # restored: later variants and the matmul rate run on every thread
    finally:
        torch.set_num_threads(threads)
    assert threaded.flops > 0 and threaded.seconds == []
    timed = script.Variant("v", batches, FAST)
    timed.run(model)
    timed.loss = 123.0  # as if a compiled copy's timed runs had given it: counting on the eager model keeps it
    timed.count(model)
    assert timed.loss == 123.0 and timed.flops > 0 and len(timed.seconds) == 1
    (loss1, grads1), (loss2, grads2) = results
    assert loss2 == pytest.approx(loss1, rel=1e-6)
    assert len(grads1) == len(grads2) > 0
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-5) for a, b in zip(grads1, grads2))
