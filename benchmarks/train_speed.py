"""Training speed of the soft-prompt loss: today's plain forward vs each shortcut alone and all combined.

Same rows, same losses: every variant runs forward + backward over the same real Shakespeare lines (stage 1: the
pretraining format, gradients to W, b and the mixtures; stage 2: one persona's lines with its text persona,
gradients to its mixture only), and its mean loss is compared with the plain path's. Variants are measured in
interleaved rounds so that other load on the machine hits all of them alike; the report gives example passes per
second (one row through forward and backward) and the ratio to the plain path.

    python benchmarks/train_speed.py            # SmolLM2-135M-Instruct on this CPU
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from _common import (
    add_common_arguments,
    command_line,
    count_flops,
    hardware,
    load_model,
    markdown_table,
    ratio,
    setup,
    write_report,
)
from peft import get_peft_model
from tqdm.auto import tqdm

from peft_personamux import PersonaMuxConfig
from peft_personamux.collator import PersonaMuxCollator
from peft_personamux.compiled_layers import compile_decoder_layers
from peft_personamux.loss import (
    PLAIN,
    LossOptions,
    PrefixCache,
    bf16_matmul_speedup,
    choose_attention,
    mean_response_loss,
)
from peft_personamux.machine import matmul_rate
from peft_personamux.sampling import PersonaBatchSampler, row_lengths

NAME = "train_speed"


def pretraining_split():
    from peft_personamux.data import load_shakespeare, split_personas

    train, _ = split_personas(load_shakespeare(min_lines=40, max_chars=120), 0.75, 0)
    return train


def shakespeare_rows(count: int, seed: int) -> list[dict[str, str]]:
    """``count`` random lines of the pretraining split (the issue's stage-1 batches: personas mixed at random)."""
    rows = pretraining_split().to_list()
    random.Random(seed).shuffle(rows)
    return rows[:count]


def shipped_batches_rows(count: int, batch_size: int, personas_per_batch: int, seed: int) -> list[dict[str, str]]:
    """The first ``count`` lines, in batch order, of the shipped pretraining's sampler over the same split and lines
    (docs/pretrained/pretrain_cmd.sh: 48 lines per persona, ``personas_per_batch`` personas per batch, length
    grouped), so that consecutive runs of ``batch_size`` rows are its batches."""
    from peft_personamux.data.flags import sample_per_persona

    train = sample_per_persona(pretraining_split(), None, 48, seed)
    rows = train.to_list()
    sampler = PersonaBatchSampler(
        [r["persona"] for r in rows], batch_size, personas_per_batch, lengths=row_lengths(train), seed=seed
    )
    return [rows[i] for i in list(sampler)[:count]]


def text_persona(name: str) -> str:
    play, who = name.split("/")
    return f"{who.replace('_', ' ').title()}, a character of {play.replace('_', ' ').title()}."


def make_batches(collator, rows, batch_size: int, grouped: bool, seed: int) -> list[dict[str, torch.Tensor]]:
    if grouped:
        names = [r["persona"] for r in rows]
        lengths = row_lengths({"prompt": [r["prompt"] for r in rows], "response": [r["response"] for r in rows]})
        order = list(PersonaBatchSampler(names, batch_size, lengths=lengths, seed=seed))
    else:
        order = list(range(len(rows)))
    return [collator([rows[i] for i in order[s : s + batch_size]]) for s in range(0, len(order), batch_size)]


class Variant:
    def __init__(
        self,
        name: str,
        batches,
        options: LossOptions,
        plain_forward: bool = False,
        threads=None,
        model=None,
        workers: int = 1,
    ):
        self.name, self.batches, self.options, self.plain_forward, self.threads = (
            name,
            batches,
            options,
            plain_forward,
            threads,
        )
        self.model = model  # None: the shared float32 model; else its own (bf16 weights, compiled layers)
        # > 1: the batches are split round-robin over this many Python threads, each with ``threads`` intra-op
        # threads (data parallel on one machine; gradients add up in the shared .grad)
        self.workers = workers
        self.cache = PrefixCache()
        self.seconds: list[float] = []
        self.untimed_seconds = 0.0  # compiled variants: the first run, which compiles
        self.loss = float("nan")
        self.flops = 0  # matrix-multiply FLOPs of one run over all its batches (`count`)
        self.bf16 = False  # runs its matrix multiplies in bf16 (autocast or bf16 weights)

    def run(self, model) -> None:
        start = time.perf_counter()
        if self.workers == 1:
            total, tokens = self._run_batches(model, self.batches)
        else:
            model.zero_grad(set_to_none=True)
            shares = [self.batches[i :: self.workers] for i in range(self.workers)]
            with ThreadPoolExecutor(self.workers) as pool:
                sums = list(pool.map(lambda share: self._run_batches(model, share, zero=False), shares))
            total, tokens = sum(s[0] for s in sums), sum(s[1] for s in sums)
        self.seconds.append(time.perf_counter() - start)
        self.loss = total / tokens

    def _run_batches(self, model, batches, zero: bool = True) -> tuple[float, int]:
        """Forward and backward over ``batches`` with ``threads`` intra-op threads in the calling thread (restored
        after: `count` runs a workers variant's batches on the main thread); the summed token loss and token count."""
        with intra_op_threads(self.threads):
            return self._sum_batches(model, batches, zero)

    def _sum_batches(self, model, batches, zero: bool) -> tuple[float, int]:
        cache = self.cache if self.workers == 1 else PrefixCache()
        total, tokens = 0.0, 0
        for batch in batches:
            if zero:
                model.zero_grad(set_to_none=True)
            count = int((batch["labels"][:, 1:] != -100).sum())
            if self.plain_forward:  # today's path: the tuner's forward, transformers' loss over all positions
                autocast = (
                    torch.autocast("cpu", dtype=self.options.autocast_dtype)
                    if self.options.autocast_dtype
                    else contextlib.nullcontext()
                )
                with autocast:
                    loss = model(**batch).loss
            else:
                loss = mean_response_loss(model, batch, options=self.options, prefix_cache=cache)
            loss.backward()
            total, tokens = total + float(loss.detach()) * count, tokens + count
        return total, tokens

    def count(self, model) -> None:
        """Count one untimed run's matrix-multiply FLOPs. A compiled variant is counted on ``model`` (eager, the
        same computation), its head and body too (`LossOptions.eager`): the counter does not see inside compiled
        graphs."""
        eager = model if self.model is None or COMPILED in self.name else self.model
        # the counting run's loss is the eager model's: the report keeps the timed runs' own
        options, self.options, loss = self.options, self.options.eager(), self.loss
        try:
            if self.workers > 1:  # the counter sees only its own thread: count the same batches on this one
                self.flops = count_flops(lambda: self._run_batches(eager, self.batches))
                return
            self.flops = count_flops(lambda: self.run(eager))
            self.seconds.pop()
        finally:
            self.options, self.loss = options, loss

    @property
    def rows(self) -> int:
        return sum(int(b["input_ids"].shape[0]) for b in self.batches)

    @property
    def padded_tokens(self) -> int:
        return sum(int(b["input_ids"].numel()) for b in self.batches)


def variants_for(
    collator,
    rows,
    batch_size,
    seed,
    bf16,
    full_batch: bool = False,
    bf16_model=None,
    compiled: Sequence[tuple[str, object]] = (),
    batched: bool = False,
    bodies: Sequence[tuple[str, object]] = (),
) -> list[Variant]:
    """The variants of one stage. ``full_batch``: the stage fits on all rows at once (stage 2), so the rows per
    forward pass (chunk) are free and a larger chunk gives the same summed gradient. ``bf16_model``: the same model
    with its frozen base weights stored in bf16 (the adapter stays float32), for the 'bf16 weights' variant;
    ``compiled``: (weights, model) pairs, a copy of the float32 or the bf16-weights model with its decoder layers
    compiled (`compiled_copy`), run on the library's path; ``bodies``: (weights, model) pairs, an eager copy run
    with the decoder body compiled as one region (``--compile_scope body``). ``batched``: ``rows``
    are already in a sampler's batch order (the shipped pretraining's: persona and length grouped); the fast
    variants run those batches and today's plain path the same rows in random order, as today's code batched them."""
    if batched:
        shuffled = random.Random(seed).sample(rows, len(rows))
        plain = make_batches(collator, shuffled, batch_size, False, seed)
        grouped = make_batches(collator, rows, batch_size, False, seed)
    else:
        plain = make_batches(collator, rows, batch_size, False, seed)
        grouped = make_batches(collator, rows, batch_size, True, seed)
    grouping = "persona- and length-grouped batches" if batched else "length-grouped batches"
    labels_only = LossOptions(labels_only=True, prefix_cache=False, shared_prompt=False)
    prefix = LossOptions(labels_only=False, prefix_cache=True, shared_prompt=False)
    shared = LossOptions(labels_only=False, prefix_cache=False, shared_prompt=True)
    dtype = torch.bfloat16 if bf16 else None
    # 'all': every lever, the opt-in shared soft prompt included; the library's default leaves that one out
    everything = LossOptions(labels_only=True, prefix_cache=True, autocast_dtype=dtype, shared_prompt=True)
    chosen = LossOptions(
        labels_only=True,
        prefix_cache=True,
        autocast_dtype=dtype,
        attention=choose_attention("cpu", dtype),
        shared_prompt=True,
    )
    out = [
        Variant("plain (today)", plain, PLAIN, plain_forward=True),
        Variant("logits only at labels", plain, labels_only),
        Variant("prefix KV reuse", plain, prefix),
        Variant("shared soft prompt", plain, shared),
        Variant(grouping, grouped, PLAIN, plain_forward=True),
        Variant("bf16 autocast", plain, LossOptions(autocast_dtype=torch.bfloat16), plain_forward=True),
        Variant("all (fp32)", grouped, LossOptions(labels_only=True, prefix_cache=True, shared_prompt=True)),
    ]
    if bf16:
        eager = LossOptions(
            labels_only=False, prefix_cache=False, autocast_dtype=dtype, attention="eager", shared_prompt=False
        )
        out.append(Variant("bf16 autocast + eager attention", plain, eager))
        out.append(Variant("all (bf16)", grouped, everything))
        unshared = dataclasses.replace(chosen, shared_prompt=False)
        out.append(Variant("all but the shared soft prompt (bf16, eager attention)", grouped, unshared))
        out.append(Variant("all (bf16, eager attention)", grouped, chosen))
        unpacked = dataclasses.replace(chosen, packed=False)
        out.append(Variant("all but packed rows (bf16, eager attention)", grouped, unpacked))
        recast = dataclasses.replace(chosen, keep_casts=False)  # autocast casts each frozen weight on every call
        out.append(Variant("all but kept weight casts (bf16, eager attention)", grouped, recast))
        if bf16_model is not None:  # no per-call weight casts: the frozen weights are bf16 already
            out.append(Variant("all (bf16 weights, eager attention)", grouped, chosen, model=bf16_model))
    # the library's path with `--compile_layers`: compiled decoder layers and a compiled head (`compiled_head`)
    with_head = dataclasses.replace(chosen, compiled_head=True)
    for index, (weights, compiled_model) in enumerate(compiled):
        name = f"all ({weights}, eager attention) {COMPILED}" if bf16 else f"all ({weights}) {COMPILED}"
        if index == 0:  # the ablation: the same layers, the head eager
            out.append(Variant(f"{name}, head eager", grouped, chosen, model=compiled_model))
        out.append(Variant(name, grouped, with_head, model=compiled_model))
    with_body = dataclasses.replace(with_head, compiled_body=True)
    for weights, body_model in bodies:
        name = f"all ({weights}, eager attention) {COMPILED} {BODY}" if bf16 else f"all ({weights}) {COMPILED} {BODY}"
        out.append(Variant(name, grouped, with_body, model=body_model))
    if full_batch:  # every row in one batch, as `add-persona` runs stage 2 (full batch, no micro-batch cap)
        whole = make_batches(collator, rows, len(rows), False, seed)
        out.append(Variant(WHOLE_PLAIN, whole, PLAIN, plain_forward=True))
        out.append(Variant(WHOLE_FAST, whole, chosen))
        unpacked = dataclasses.replace(chosen, packed=False)
        out.append(Variant("all but packed rows, the whole batch at once", whole, unpacked))
    if torch.get_num_threads() > 1:
        out.append(Variant("all, 1 thread", grouped, chosen, threads=1))
        workers = torch.get_num_threads()
        name = f"all, {workers} Python threads x 1 thread (batches split between them)"
        out.append(Variant(name, grouped, chosen, threads=1, workers=workers))
    for variant in out:
        bf16_weights = bf16_model is not None and variant.model is bf16_model
        variant.bf16 = variant.options.autocast_dtype == torch.bfloat16 or bf16_weights
    return out


WHOLE_PLAIN = "plain (today), the whole batch at once (as today's add-persona runs stage 2)"
WHOLE_FAST = "all (the library's path), the whole batch at once (as add-persona runs stage 2)"


def bf16_weights_copy(model):
    """A copy of ``model`` whose frozen base weights are bf16 and whose Persona-Mux weights stay float32 (the
    trained numbers keep full precision; the soft prompt is cast to the embeddings' dtype where it is inserted)."""
    twin = copy.deepcopy(model)
    for name, param in twin.named_parameters():
        if "personamux" not in name:
            param.data = param.data.to(torch.bfloat16)
    return twin


STAGE_TITLES = ("Stage 1 (codebook pretraining rows)", "Stage 2 (one persona, with text persona)")
COMPILED = "+ --compile_layers"  # in a variant's name: its model's decoder layers (and head, unless named) compiled
BODY = "--compile_scope body"  # after COMPILED: the decoder body compiled as one region instead of layer by layer


@contextlib.contextmanager
def intra_op_threads(threads: int | None):
    """Within the block, the calling thread runs torch ops on ``threads`` intra-op threads (None: unchanged)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compiled_copy(model):
    """A copy of ``model`` whose decoder layers are compiled as ``--compile_layers`` compiles them
    (`compiled_layers.compile_decoder_layers`: inductor, dynamic shapes); the adapter, embeddings and head stay
    eager (a variant's `LossOptions.compiled_head` compiles the head)."""
    twin = copy.deepcopy(model)
    compile_decoder_layers(twin)
    return twin


def measure(model, variants: Sequence[Variant], rounds: int, desc: str) -> None:
    """``rounds`` interleaved runs of every variant; the report takes each one's fastest (the first round also
    fills the prefix caches, a one-time cost that training amortises). Compiled variants first run once untimed:
    compiling is a one-time cost too (its seconds are logged)."""
    compiled = [v for v in variants if COMPILED in v.name]
    bar = tqdm(total=len(compiled) + (rounds + 1) * len(variants), desc=desc, unit="run")
    for variant in compiled:
        start = time.perf_counter()
        variant.run(variant.model)
        variant.seconds.clear()
        variant.untimed_seconds = time.perf_counter() - start
        bar.update(1)
    for _ in range(rounds):
        for variant in variants:
            variant.run(variant.model if variant.model is not None else model)
            bar.update(1)
    for variant in variants:  # untimed: the counter's own overhead would distort the clock
        variant.count(model)
        bar.update(1)
    bar.close()


def table(variants: Sequence[Variant], matmul: dict[str, float]) -> tuple[str, list[dict]]:
    """The stage's table and records. ``matmul``: this CPU's measured matrix-multiply FLOP/s per dtype name; each
    variant's counted FLOPs over its time give its achieved rate, and its FLOPs at its dtype's measured rate the
    fastest it could run (its ceiling, as a ratio to plain like the measured speed)."""
    base = variants[0]
    base_rate = base.rows / min(base.seconds)
    rows, records = [], []
    for v in variants:
        rate = v.rows / min(v.seconds)
        diff = abs(v.loss - base.loss) / base.loss
        achieved = v.flops / min(v.seconds)  # FLOP/s
        peak = matmul["bfloat16" if v.bf16 else "float32"]
        ceiling = v.rows / (v.flops / peak) if v.flops else float("nan")  # passes/s at the measured matmul rate
        rows.append(
            [
                v.name,
                round(rate, 3),
                round(ratio(rate, base_rate), 2),
                round(v.flops / v.rows / 1e9, 1),
                f"{achieved / 1e9:.0f} ({100 * achieved / peak:.0f}%)",
                round(ratio(ceiling, base_rate), 2),
                round(v.loss, 5),
                f"{diff:.1e}",
            ]
        )
        records.append(
            {
                "variant": v.name,
                "passes_per_second": rate,
                "ratio": ratio(rate, base_rate),
                "matmul_dtype": "bfloat16" if v.bf16 else "float32",
                "flops": v.flops,
                "flops_per_pass": v.flops / v.rows,
                "matmul_flops_per_second": achieved,
                "share_of_matmul_rate": achieved / peak,
                "ceiling_passes_per_second": ceiling,
                "ceiling_ratio": ratio(ceiling, base_rate),
                "mean_loss": v.loss,
                "relative_loss_difference": diff,
                "padded_tokens": v.padded_tokens,
                "rows_per_batch": max(int(b["input_ids"].shape[0]) for b in v.batches),
                "untimed_seconds": v.untimed_seconds,
                "seconds": v.seconds,
            }
        )
    headers = [
        "variant",
        "example passes / s",
        "× plain",
        "GFLOP / pass",
        "GFLOP/s (% of matmul rate)",
        "ceiling × plain",
        "mean loss",
        "|Δloss| / loss",
    ]
    return markdown_table(headers, rows), records


MATMUL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def whole_batch_note(records: Sequence[dict]) -> list[str]:
    """Stage 2 as each side runs it by default (its whole batch at once): the library's path over today's."""
    by_name = {r["variant"]: r for r in records}
    if WHOLE_PLAIN not in by_name or WHOLE_FAST not in by_name:
        return []
    plain, fast = by_name[WHOLE_PLAIN], by_name[WHOLE_FAST]
    return [
        f"Stage 2 as each side runs it by default, the whole batch at once: the library's path "
        f"{ratio(fast['passes_per_second'], plain['passes_per_second']):.2f}x today's "
        f"({fast['passes_per_second']:.2f} against {plain['passes_per_second']:.2f} passes per second); against "
        f"today's path in batches of {records[0]['rows_per_batch']} (the table's plain row, "
        f"{'faster' if records[0]['passes_per_second'] > plain['passes_per_second'] else 'slower'} than today's "
        f"whole batch here) {fast['ratio']:.2f}x."
    ]


def model_matmul_shapes(config, plain: Variant) -> list[tuple[int, int, int]]:
    """The decoder's projection shapes (m, k, n) for one batch of ``plain``'s: m its mean tokens per batch."""
    tokens = round(plain.padded_tokens / len(plain.batches))
    hidden = config.hidden_size
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    return [(tokens, hidden, hidden), (tokens, hidden, inner), (tokens, inner, hidden)]


def best_variant(records: Sequence[dict]) -> str:
    """The fastest variant after plain (the first record), as 'ratio (name)'."""
    best = max(records[1:], key=lambda r: r["ratio"])
    return f"{best['ratio']:.2f}x ({best['variant']})"


def highest_ceiling(records: Sequence[dict]) -> str:
    best = max(records, key=lambda r: r["ceiling_ratio"] if r["flops"] else 0.0)
    return f"{best['ceiling_ratio']:.2f}x ({best['variant']})"


def model_and_rows(args: argparse.Namespace, device: torch.device, personas_per_batch: int | None):
    """The Persona-Mux model over ``args``' base (its codebook training), its tokenizer and label, and both stages'
    rows: random pretraining lines, and stage 1's (the shipped sampler's batches with ``personas_per_batch``; None:
    the same random lines)."""
    base, tokenizer, label = load_model(args, device)
    model = get_peft_model(
        base, PersonaMuxConfig(num_codes=64, tokens_per_code=8, num_bias_tokens=12, task_type="CAUSAL_LM")
    )
    rows = shakespeare_rows(args.rows, args.seed)
    rows1 = rows
    if personas_per_batch is not None:
        rows1 = shipped_batches_rows(args.rows, args.batch_size, personas_per_batch, args.seed)
    model.add_personas(sorted({r["persona"] for r in rows + rows1}))
    model.train_codebook()
    return model, tokenizer, label, rows, rows1


def rows_parser(doc: str, rows: int, rows_help: str) -> argparse.ArgumentParser:
    """The parser the training benchmarks start from: the common flags, ``--rows`` and ``--batch-size``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--rows", type=int, default=rows, help=rows_help)
    parser.add_argument("--batch-size", type=int, default=8)
    return parser


def real_lines_setup(args: argparse.Namespace, script: str) -> torch.device:
    """`setup`, refusing the synthetic models: the training benchmarks run real lines through the real tokenizer."""
    device = setup(args)
    if args.tiny or args.random_llama_8b:
        raise SystemExit(f"{script} runs real lines through the real tokenizer: use the default model or --model.")
    return device


def main(argv: Sequence[str] | None = None) -> dict:
    parser = rows_parser(__doc__, 32, "Rows per stage (the same rows for every variant).")
    parser.add_argument("--rounds", type=int, default=2, help="Interleaved timed rounds (the fastest counts).")
    parser.add_argument(
        "--stage1-batches",
        choices=("shipped", "random"),
        default="shipped",
        help="Stage-1 rows: 'shipped' are the shipped pretraining command's batches (2 personas per batch, length "
        "grouped: docs/pretrained/pretrain_cmd.sh); 'random' are random lines, personas mixed (the issue's stage 1).",
    )
    parser.add_argument("--personas-per-batch", type=int, default=2, help="Stage-1 personas per batch ('shipped').")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="Add the library's path with --compile_layers (decoder layers compiled by torch.compile) and with "
        "--compile_scope body (the decoder body as one compiled region), on the float32 and, where bf16 is "
        "chosen, the bf16-weights model (needs a C++ compiler; compiling takes minutes and is not timed).",
    )
    parser.add_argument(
        "--stages",
        choices=("1", "2", "both"),
        default="both",
        help="Which stages to time (one stage alone takes about half the time; its ratios are the same measure).",
    )
    args = parser.parse_args(argv)
    device = real_lines_setup(args, "train_speed.py")
    shipped = args.stage1_batches == "shipped"
    model, tokenizer, label, rows, rows1 = model_and_rows(args, device, args.personas_per_batch if shipped else None)
    speedup = bf16_matmul_speedup() if device.type == "cpu" else float("nan")
    bf16 = device.type == "cpu" and speedup >= 1.25
    bf16_model = bf16_weights_copy(model) if bf16 else None
    compiled, bodies = [], []
    if args.compile:
        compiled.append(("bf16" if bf16 else "fp32", compiled_copy(model)))
        bodies.append(("bf16" if bf16 else "fp32", copy.deepcopy(model)))
        if bf16_model is not None:
            compiled.append(("bf16 weights", compiled_copy(bf16_model)))
            bodies.append(("bf16 weights", copy.deepcopy(bf16_model)))
    common = dict(max_prompt_tokens=48, max_response_tokens=48)
    stage1 = variants_for(
        PersonaMuxCollator.for_model(model, tokenizer, **common),
        rows1,
        args.batch_size,
        0,
        bf16,
        bf16_model=bf16_model,
        compiled=compiled,
        batched=shipped,
        bodies=bodies,
    )
    if args.stages != "2":
        measure(model, stage1, args.rounds, "stage 1")
    personas1 = [r["persona"] for r in rows1]
    # stage 2: one persona's lines with its text persona; only its mixture row trains
    one = rows[0]["persona"]
    fit_rows = [{**r, "persona": one} for r in rows]
    texts = {one: text_persona(one)}
    for each in (model, bf16_model, *(m for _, m in (*compiled, *bodies))):
        if each is not None:
            each.train_personas([one])
    collator = PersonaMuxCollator.for_model(model, tokenizer, text_personas=texts, **common)
    stage2 = variants_for(
        collator,
        fit_rows,
        args.batch_size,
        0,
        bf16,
        full_batch=True,
        bf16_model=bf16_model,
        compiled=compiled,
        bodies=bodies,
    )
    if args.stages != "1":
        measure(model, stage2, args.rounds, "stage 2")
    # (title, variants) of the stages timed
    timed = list(zip(STAGE_TITLES, (stage1, stage2)))
    timed = [timed[int(args.stages) - 1]] if args.stages != "both" else timed
    shapes = model_matmul_shapes(model.get_base_model().config, timed[0][1][0])
    matmul = {name: matmul_rate(dtype, shapes, device, repeats=10) for name, dtype in MATMUL_DTYPES.items()}
    # what `weight_casts.kept_casts` keeps: a bf16 copy of every frozen plain nn.Linear weight
    linears = [m.weight for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad]
    kept_bytes = 2 * sum(w.numel() for w in linears)
    tables = {title: table(variants, matmul) for title, variants in timed}
    records1, records2 = (tables[title][1] if title in tables else [] for title in STAGE_TITLES)
    timed_records = [(stage, records) for stage, records in (("stage 1", records1), ("stage 2", records2)) if records]
    payload = {
        "command": command_line(__file__, argv),
        "hardware": hardware(device, args.dtype),
        "model": label,
        "rows": args.rows,
        "batch_size": args.batch_size,
        "stage1_batches": args.stage1_batches,
        "stage1_personas": len(set(personas1)),
        "bf16_matmul_speedup": speedup,
        "kept_casts_bytes": kept_bytes,
        "bf16_chosen": bf16,
        "matmul_shapes": shapes,
        "matmul_flops_per_second": matmul,
        "stage1": records1,
        "stage2": records2,
    }
    notes = [
        f"bf16 matmul on this CPU: {speedup:.2f}x float32 (`loss.choose_autocast` takes bf16 at >= 1.25x): "
        f"{'bf16' if bf16 else 'float32'} is what training uses here.",
        "Best combined: " + ", ".join(f"{stage} {best_variant(records)}" for stage, records in timed_records) + ".",
        *whole_batch_note(records2),
        f"Matrix-multiply rate of this CPU at the model's shapes ({shapes}, m x k x n, rows = one plain batch's "
        f"tokens), measured in the same run: float32 {matmul['float32'] / 1e9:.0f} GFLOP/s, bf16 "
        f"{matmul['bfloat16'] / 1e9:.0f} GFLOP/s. 'GFLOP / pass' counts a variant's matrix multiplies, forward and "
        "backward (torch's FlopCounterMode; elementwise work, norms and softmax are not counted), per row; "
        "'ceiling' is the speed those FLOPs would reach at its dtype's measured rate with no other cost, as a ratio "
        "to plain. Highest ceiling: "
        + ", ".join(f"{stage} {highest_ceiling(records)}" for stage, records in timed_records)
        + ".",
        "Stage 1 rows have no text persona: the soft prompt goes first in the row, so there is no prefix to reuse "
        "and 'prefix KV reuse' equals the plain body there; stage 2 rows carry a text persona after the chat "
        "template's system turn.",
        "'shared soft prompt': rows with the same prefix and persona run the soft prompt's virtual tokens, and the "
        "tokens they all have right after it (the chat template's system turn and instruction), once and share "
        "their key/value states. "
        + (
            f"Stage 1's rows are the shipped pretraining's batches ({len(set(personas1))} personas in "
            f"{len(personas1)} rows, {args.personas_per_batch} per batch of {args.batch_size}, length grouped, as "
            "docs/pretrained/pretrain_cmd.sh trains); today's plain path runs the same rows in random order, as "
            "today's code batched them, and 'persona- and length-grouped batches' is the plain path on the shipped "
            "batches. "
            if shipped
            else f"Stage 1's rows are random pretraining lines ({len(set(personas1))} personas in "
            f"{len(personas1)} rows), so little is shared there. "
        )
        + "Stage 2's are one persona's, one group per batch.",
        "'all' is every shortcut; with bf16 the library also picks eager attention (`loss.choose_attention`), the "
        "'eager attention' rows. 'all (bf16, eager attention)' is what `personamux pretrain` and `add-persona` run "
        "here by default (`loss.FAST` with the autocast and attention they choose on this CPU); 'bf16 weights' is the "
        "same loss with the base model loaded in bf16 (`--dtype bfloat16`; the adapter stays float32); rows with "
        "'--compile_layers' are the same loss with the base model's decoder layers compiled by torch.compile "
        "(`compiled_layers`; the training argument of that name) and, as that argument does, the output head with "
        "its cross entropy (`LossOptions.compiled_head`; 'head eager': without it); "
        f"'{BODY}' compiles everything after the input embeddings as one region instead of each layer on its "
        "own (`LossOptions.compiled_body`), the head too. Stage 2 fits on all of a "
        "persona's rows at once (full batch), so its rows per "
        "forward pass are free: 'the whole batch at once' is the same summed gradient in one pass, as `add-persona` "
        "and today's code run it by default (no `max_micro_batch_size`); its packed rows run in lines of a few rows "
        "each (`shared_prompt.line_layout`). 'kept weight casts' "
        "(`LossOptions.keep_casts`, on by default): each frozen linear weight is cast to bf16 once and kept, "
        "instead of by autocast on every call (the same numbers); the copies hold "
        f"{kept_bytes / 1e6:.0f} MB here (2 bytes per frozen nn.Linear weight).",
        "|Δloss| / loss compares each variant's mean loss over the same rows with the plain path's (fp32 variants "
        "are exact up to float rounding; bf16 ones are not).",
    ]
    if args.stages != "both":
        notes.append(
            f"Only stage {args.stages} was timed (`--stages {args.stages}`): the notes on the other stage's rows "
            "describe a stage without a table here."
        )
    for stage, records in timed_records:
        notes += [
            f"{r['variant']}, {stage}: its first run compiled and took {r['untimed_seconds']:.0f} s (not timed)."
            for r in records
            if r["untimed_seconds"]
        ]
    write_report(
        NAME,
        args.output_dir,
        payload,
        "Training speed: example passes per second, plain vs fast loss",
        [(title, markdown) for title, (markdown, _) in tables.items()],
        notes,
    )
    return payload


if __name__ == "__main__":
    main()
