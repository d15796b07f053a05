"""Persona switch latency and bytes per persona on disk: Persona-Mux vs per-persona prompt tuning vs per-persona LoRA.

    python benchmarks/switch_and_size.py                # SmolLM2-135M on CPU
    python benchmarks/switch_and_size.py --device cuda --dtype bfloat16 --random-llama-8b
    python benchmarks/switch_and_size.py --tiny         # tiny random Llama (tests)

Per method, one persona = one file (Persona-Mux: ``personas/<name>.safetensors``, 64 floats) or one adapter folder
(peft prompt tuning with 8 virtual tokens; LoRA r=8 on q/v), written with the method's own save call. Timed, each a
median over many calls after warm-up:

* **load + switch**: a persona not yet in memory. Persona-Mux: ``load_persona(file, activate=False)`` then
  ``set_persona(name)``; peft: ``load_adapter(folder, adapter_name=new)`` then ``set_adapter(new)``.
* **switch (registered)**: a persona already in memory. Persona-Mux: ``set_persona``; peft: ``set_adapter``.

Persona-Mux needs its shared codebook once (reported apart); every other persona costs only its own file.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import _common
import torch

logger = logging.getLogger("benchmarks.switch_and_size")

NAME = "switch_and_size"
METHODS = ("personamux", "prompt_tuning", "lora")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what save_pretrained writes that loading needs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_common_arguments(parser)
    parser.add_argument("--loads", type=int, default=None, help="Timed load + switch calls per method (default 50).")
    parser.add_argument(
        "--switches", type=int, default=None, help="Timed switches between registered personas (default 1000)."
    )
    parser.add_argument("--registered", type=int, default=8, help="Personas kept in memory for the switch timing.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed load + switch calls per method first.")
    parser.add_argument("--prompt-tokens", type=int, default=8, help="Prompt tuning: num_virtual_tokens.")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank.")
    parser.add_argument("--lora-targets", default="q_proj,v_proj", help="Comma-separated LoRA target modules.")
    parser.add_argument("--work-dir", default=None, help="Where the adapters are written (default: a temp folder).")
    args = parser.parse_args(argv)
    if args.loads is None:
        args.loads = 10 if args.tiny else 50
    if args.switches is None:
        args.switches = 200 if args.tiny else 1000
    for key in ("loads", "switches", "registered", "prompt_tokens", "lora_rank"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be positive, got {getattr(args, key)}.")
    return args


def adapter_bytes(folder: str | os.PathLike) -> int:
    """Bytes a peft adapter folder needs to be loaded (the README.md model card left out)."""
    return sum(os.path.getsize(Path(folder) / name) for name in ADAPTER_FILES)


# -- per-method setup ------------------------------------------------------------------------------------------------


class Method:
    """What the timing loop needs from a method: its save folder sizes and its load/switch calls."""

    def __init__(self, name: str, model, work: Path) -> None:
        self.name, self.model, self.work = name, model, work
        self.sizes: dict[str, int] = {}

    def load_and_switch(self, i: int) -> Callable[[], Any]:
        raise NotImplementedError

    def switch(self, name: str) -> None:
        raise NotImplementedError

    def registered_names(self, count: int) -> list[str]:
        raise NotImplementedError


class PersonaMux(Method):
    def __init__(self, base, work: Path, count: int, seed: int) -> None:
        from peft import get_peft_model

        from peft_personamux import PersonaMuxConfig

        model = get_peft_model(base, PersonaMuxConfig(task_type="CAUSAL_LM"))
        model.freeze()
        super().__init__("personamux", model.eval(), work)
        model.save_pretrained(str(work))  # the shared codebook (W and b), once for all personas
        num_codes = model.peft_config["default"].num_codes
        g = torch.Generator().manual_seed(seed)
        names = [f"persona_{i:05d}" for i in range(count)]
        model.add_personas(names, mixtures=torch.randn(count, num_codes, generator=g))
        self.files = [model.save_persona(name, str(work)) for name in names]
        for name in names:  # the timed loads register them anew
            model.remove_persona(name)
        self.sizes = {
            "per_persona_bytes": os.path.getsize(self.files[0]),
            "shared_once_bytes": adapter_bytes(work),  # the codebook adapter: W, b and the config
        }

    def load_and_switch(self, i: int) -> Callable[[], Any]:
        def call() -> None:
            name = self.model.load_persona(self.files[i], activate=False)
            self.model.set_persona(name)

        return call

    def switch(self, name: str) -> None:
        self.model.set_persona(name)

    def registered_names(self, count: int) -> list[str]:
        return self.model.personas[:count]


class PeftAdapter(Method):
    """A peft method whose every persona is one adapter folder, loaded with load_adapter."""

    def __init__(self, name: str, base, config, work: Path) -> None:
        from peft import get_peft_model

        model = get_peft_model(base, config)
        super().__init__(name, model.eval(), work)
        self.folder = work / "persona"
        model.save_pretrained(str(self.folder))
        self.sizes = {
            "per_persona_bytes": adapter_bytes(self.folder),
            "weights_file_bytes": os.path.getsize(self.folder / "adapter_model.safetensors"),
            "shared_once_bytes": 0,
        }

    def load_and_switch(self, i: int) -> Callable[[], Any]:
        def call() -> None:
            self.model.load_adapter(str(self.folder), adapter_name=f"p{i}")
            self.model.set_adapter(f"p{i}")

        return call

    def switch(self, name: str) -> None:
        self.model.set_adapter(name)

    def registered_names(self, count: int) -> list[str]:
        return [n for n in self.model.peft_config if n != "default"][:count]


def build_methods(base, args: argparse.Namespace, work: Path) -> list[Method]:
    from peft import LoraConfig, PromptTuningConfig

    count = args.loads + args.warmup
    prompt_tuning = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=args.prompt_tokens)
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=args.lora_rank,
        lora_alpha=2 * args.lora_rank,
        target_modules=args.lora_targets.split(","),
        init_lora_weights=False,
    )
    methods: list[Method] = []
    for name, make in (
        ("personamux", lambda b, w: PersonaMux(b, w, count, args.seed)),
        ("prompt_tuning", lambda b, w: PeftAdapter("prompt_tuning", b, prompt_tuning, w)),
        ("lora", lambda b, w: PeftAdapter("lora", b, lora, w)),
    ):
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        methods.append(make(_common.shared_weights_copy(base), folder))  # each wraps its own module tree
    return methods


# -- benchmark -------------------------------------------------------------------------------------------------------


def measure(method: Method, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    loads = []
    for i in range(args.warmup + args.loads):
        elapsed, _ = _common.timed(method.load_and_switch(i), device)
        if i >= args.warmup:
            loads.append(elapsed)
    names = method.registered_names(args.registered)
    switches = []
    for i in range(args.switches):
        name = names[i % len(names)]
        elapsed, _ = _common.timed(lambda n=name: method.switch(n), device)
        switches.append(elapsed)
    result = {
        "load_and_switch_seconds": _common.median(loads),
        "switch_registered_seconds": _common.median(switches),
        "loads": len(loads),
        "switches": len(switches),
        "registered": len(names),
        **method.sizes,
    }
    if isinstance(method, PersonaMux):
        # load_persona checks the file's codebook fingerprint, which hashes W and b on every call
        times = [_common.timed(method.model.codebook_fingerprint, device)[0] for _ in range(max(3, args.loads // 5))]
        result["codebook_fingerprint_seconds"] = _common.median(times)
    logger.info(
        "%s: load+switch %.3g ms, switch %.3g us, %d bytes per persona",
        method.name,
        1e3 * result["load_and_switch_seconds"],
        1e6 * result["switch_registered_seconds"],
        result["per_persona_bytes"],
    )
    return result


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    base, _, model_name = _common.load_model(args, device)
    with tempfile.TemporaryDirectory(prefix="switch_and_size_") as tmp:
        work = Path(args.work_dir or tmp)
        methods = build_methods(base, args, work)
        results = {m.name: measure(m, args, device) for m in methods}
    return {"model": model_name, "results": results}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = _common.setup(args)
    measured = run(args, device)
    results = measured["results"]
    mux = results["personamux"]
    ratios = {}
    for name in ("prompt_tuning", "lora"):
        other = results[name]
        ratios[name] = {
            "bytes_vs_personamux": _common.ratio(other["per_persona_bytes"], mux["per_persona_bytes"]),
            "load_and_switch_vs_personamux": _common.ratio(
                other["load_and_switch_seconds"], mux["load_and_switch_seconds"]
            ),
            "switch_registered_vs_personamux": _common.ratio(
                other["switch_registered_seconds"], mux["switch_registered_seconds"]
            ),
        }
    payload = {
        "benchmark": NAME,
        "command": _common.command_line(__file__, argv),
        "model": measured["model"],
        "hardware": _common.hardware(device, args.dtype),
        "settings": {
            "loads": args.loads,
            "switches": args.switches,
            "registered": args.registered,
            "warmup": args.warmup,
            "prompt_tuning_virtual_tokens": args.prompt_tokens,
            "lora": {"rank": args.lora_rank, "targets": args.lora_targets},
        },
        "results": results,
        "ratios": ratios,
    }
    write(payload, args)
    return payload


def write(payload: dict[str, Any], args: argparse.Namespace) -> None:
    results, ratios = payload["results"], payload["ratios"]
    labels = {
        "personamux": "Persona-Mux (64 weights)",
        "prompt_tuning": f"prompt tuning ({args.prompt_tokens} virtual tokens)",
        "lora": f"LoRA r={args.lora_rank} q/v",
    }
    rows = []
    for name in METHODS:
        r = results[name]
        x = ratios.get(name, {})
        rows.append(
            [
                labels[name],
                r["per_persona_bytes"],
                x.get("bytes_vs_personamux", 1.0),
                r["shared_once_bytes"],
                1e3 * r["load_and_switch_seconds"],
                x.get("load_and_switch_vs_personamux", 1.0),
                1e6 * r["switch_registered_seconds"],
                x.get("switch_registered_vs_personamux", 1.0),
            ]
        )
    table = _common.markdown_table(
        [
            "method",
            "bytes / persona",
            "x Persona-Mux",
            "shared bytes (once)",
            "load + switch (ms)",
            "x Persona-Mux",
            "switch, registered (us)",
            "x Persona-Mux",
        ],
        rows,
    )
    mux = results["personamux"]
    notes = [
        "Bytes per persona: Persona-Mux's personas/<name>.safetensors; peft: the save_pretrained folder "
        "(adapter_model.safetensors + adapter_config.json; README.md left out). Persona-Mux's shared codebook "
        "adapter is written once.",
        "load + switch: Persona-Mux load_persona(file, activate=False) + set_persona(name); peft "
        "load_adapter(folder, adapter_name=new) + set_adapter(new). Files are in the OS page cache after the first "
        f"read. Median of {payload['settings']['loads']} calls after {payload['settings']['warmup']} warm-up calls.",
        f"switch, registered: median of {payload['settings']['switches']} calls cycling {mux['registered']} personas "
        "already in memory (each call timed alone, so ~0.1 us of timer overhead is included).",
        f"Of Persona-Mux's load, {1e3 * mux['codebook_fingerprint_seconds']:.3g} ms is the codebook fingerprint check "
        "(W and b are hashed on every load_persona call).",
        "Persona-Mux also serves a different persona per row in one batch (persona_ids=) with no switch at all.",
    ]
    if args.tiny or args.random_llama_8b:
        notes.append("Random weights: sizes and timings are meaningful, values are not.")
    _common.write_report(
        NAME,
        args.output_dir,
        payload,
        "Persona switch latency and size on disk",
        [("Per persona", table)],
        notes,
    )
    print(table)


if __name__ == "__main__":
    main()
