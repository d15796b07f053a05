"""Training stages with transformers.Trainer on a tiny model: freezing, logs, columns, checkpoints, resume, DDP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from tiny_models import codebook_args, fit_args, make_rows, make_tokenizer, needs_compiler
from tiny_models import make_mux_model as make_model
from transformers import HfArgumentParser, Trainer, TrainerCallback

from peft_personamux.collator import PersonaMuxCollator
from peft_personamux.persona_files import list_persona_files
from peft_personamux.training import (
    LOSS_CURVE_NAME,
    LOSS_LOG_NAME,
    STAGE_KEY,
    CodebookTrainingArguments,
    PersonaFitArguments,
    PersonaMuxTrainer,
    StageSwitchCallback,
    build_codebook_trainer,
    build_fit_trainer,
    evaluate_loss,
    fit_personas,
    full_batch_arguments,
    pretrain_codebook,
)
from peft_personamux.training.trainer import FAST_LOSS_KEY


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def layer_of(model):
    return model.get_input_embeddings()


def snapshot(model) -> dict[str, torch.Tensor]:
    layer = layer_of(model)
    return {
        "codebook": layer.personamux_codebook["default"].detach().clone(),
        "bias": layer.personamux_bias["default"].detach().clone(),
        "mixture": layer.mixture["default"].detach().clone(),
    }


class Snapshots(TrainerCallback):
    """Parameters after every optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append(snapshot(model))


def test_argument_defaults_and_validation(tmp_path):
    args = HfArgumentParser(CodebookTrainingArguments).parse_args_into_dataclasses(["--output_dir", str(tmp_path)])[0]
    assert (args.adam_epsilon, args.weight_decay, args.learning_rate, args.warmup_epochs) == (1e-4, 0.0, 1e-3, 1.0)
    assert args.bf16 == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert args.label_names == ["labels"] and args.ddp_find_unused_parameters
    parse = HfArgumentParser(CodebookTrainingArguments).parse_args_into_dataclasses
    assert parse(["--output_dir", str(tmp_path), "--bf16", "False"])[0].bf16 is False
    assert CodebookTrainingArguments(output_dir=str(tmp_path), use_cpu=True).bf16 is False
    fit = PersonaFitArguments(output_dir=str(tmp_path))
    assert (fit.max_steps, fit.adam_epsilon, fit.save_strategy) == (100, 1e-4, "no")
    with pytest.raises(ValueError, match="`weight_decay` must be 0"):
        PersonaFitArguments(output_dir=str(tmp_path), weight_decay=0.1)
    with pytest.raises(ValueError, match="`warmup_epochs` must be >= 0"):
        CodebookTrainingArguments(output_dir=str(tmp_path), warmup_epochs=-1)
    with pytest.raises(ValueError, match="`max_prompt_tokens`"):
        CodebookTrainingArguments(output_dir=str(tmp_path), max_prompt_tokens=0)
    with pytest.raises(ValueError, match="`max_micro_batch_size`"):
        PersonaFitArguments(output_dir=str(tmp_path), max_micro_batch_size=0)
    with pytest.raises(ValueError, match="`attention` must be one of"):
        CodebookTrainingArguments(output_dir=str(tmp_path), attention="flash")
    assert (fit.fit_method, fit.fisher_steps) == ("adam", 6)
    with pytest.raises(ValueError, match="`fit_method` must be 'adam', 'fisher' or 'lbfgs', got 'sgd'"):
        PersonaFitArguments(output_dir=str(tmp_path), fit_method="sgd")
    with pytest.raises(ValueError, match="`fisher_steps`"):
        PersonaFitArguments(output_dir=str(tmp_path), fisher_steps=0)
    with pytest.raises(ValueError, match="`lbfgs_steps`"):
        PersonaFitArguments(output_dir=str(tmp_path), lbfgs_steps=0)
    with pytest.raises(ValueError, match="`fit_start` must be 'zero' or 'mean', got 'one'"):
        PersonaFitArguments(output_dir=str(tmp_path), fit_start="one")


def test_persona_columns_survive_remove_unused_columns(tokenizer, tmp_path):
    model = make_model(tokenizer)
    model.add_personas(["play/a", "play/b"])
    rows = [{**row, "persona_ids": model.persona_index(row["persona"])} for row in make_rows()]
    ds = Dataset.from_list(rows)
    args = codebook_args(tmp_path, remove_unused_columns=True)
    collator = PersonaMuxCollator.for_model(model, tokenizer)
    kept = PersonaMuxTrainer(model=model, args=args, train_dataset=ds, data_collator=collator)
    assert set(kept._remove_unused_columns(ds).column_names) == {"persona", "persona_ids", "prompt", "response"}
    batch = next(iter(kept.get_train_dataloader()))
    assert sorted(batch["persona_ids"].tolist()) == [0, 0, 1, 1]
    # plain Trainer would drop them: the base model's forward names none of these columns
    plain = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator)
    with pytest.raises(ValueError, match="No columns in the dataset match"):
        plain._remove_unused_columns(ds)


def test_stage1_warmup_trains_bias_only_then_everything(tokenizer, tmp_path):
    model = make_model(tokenizer)
    ds = Dataset.from_list(make_rows(per_persona=4))  # 8 rows, batch 4: 2 steps per epoch, 4 in all
    snaps = Snapshots()
    trainer = build_codebook_trainer(model, tokenizer, ds, codebook_args(tmp_path), callbacks=[snaps])
    start = snapshot(model)
    loss_before = evaluate_loss(model, tokenizer, ds)
    trainer.train()
    assert model.personas == ["play/a", "play/b"]
    # the optimizer was built with W, b and the mixture table, although the warm-up freezes W and the table
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    for name in ("personamux_codebook", "personamux_bias", "mixture"):
        assert id(getattr(layer_of(model), name)["default"]) in in_optimizer
    # steps 1-2 (epoch 1): only b moves and the mixtures stay 0
    for step in (0, 1):
        assert torch.equal(snaps.steps[step]["codebook"], start["codebook"])
        assert not snaps.steps[step]["mixture"].any()
        assert not torch.equal(snaps.steps[step]["bias"], (snaps.steps[step - 1] if step else start)["bias"])
    # step 3: W's gradient is still 0 (it is scaled by the mixtures, all 0 until this update); step 4: all move
    moved = [{k for k in start if not torch.equal(snaps.steps[i][k], snaps.steps[i - 1][k])} for i in (2, 3)]
    assert moved == [{"bias", "mixture"}, {"codebook", "bias", "mixture"}]
    history = trainer.state.log_history
    stages = [(e[STAGE_KEY], e["step"]) for e in history if STAGE_KEY in e]
    assert stages == [("bias_warmup", 0), ("codebook", 2)]
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    loss_after = evaluate_loss(model, tokenizer, ds)
    assert all(loss_after[n] < loss_before[n] for n in loss_before)
    # loss log and curve
    lines = (tmp_path / LOSS_LOG_NAME).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)] == [1, 2, 3, 4]
    assert (tmp_path / LOSS_CURVE_NAME).read_bytes()[:4] == b"\x89PNG"


def test_pretrain_codebook_saves_adapter_and_personas(tokenizer, tmp_path):
    model = make_model(tokenizer)
    ds = Dataset.from_list(make_rows(per_persona=2))
    trainer = pretrain_codebook(model, tokenizer, ds, codebook_args(tmp_path, num_train_epochs=2, warmup_epochs=1))
    assert trainer.state.global_step == 2
    assert sorted(list_persona_files(tmp_path)) == ["play/a", "play/b"]
    assert (tmp_path / "adapter_model.safetensors").is_file() and not (tmp_path / "training_args.bin").exists()
    assert not any(p.requires_grad for p in model.parameters())  # frozen after pretraining


def test_gradient_checkpointing_trains(tokenizer, tmp_path):
    model = make_model(tokenizer)
    ds = Dataset.from_list(make_rows(per_persona=2))
    args = codebook_args(tmp_path, activation_checkpointing=True, warmup_epochs=0, max_steps=2, loss_log=False)
    before = snapshot(model)
    build_codebook_trainer(model, tokenizer, ds, args).train()
    after = snapshot(model)
    assert all(not torch.equal(before[k], after[k]) for k in before)


@needs_compiler
def test_compile_layers_trains_with_compiled_decoder_layers_and_saves_the_same_files(tokenizer, tmp_path, monkeypatch):
    import peft_personamux.loss as loss_module
    from peft_personamux.compiled_layers import decoder_layers

    heads: list[int] = []  # one entry per call of the compiled head
    compiled_head = loss_module._compiled_head_nll()
    monkeypatch.setattr(loss_module, "_compiled_head_nll", lambda: heads.append(1) or compiled_head)

    def compiled(model) -> bool:
        return all(layer._compiled_call_impl is not None for layer in decoder_layers(model))

    in_steps: list[bool] = []  # the layers' state inside each training step's loss
    in_callbacks: list[bool] = []  # and where callbacks run (the identity diagnostic: eager, no graphs of its own)

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            in_callbacks.append(compiled(model))

    model = make_model(tokenizer)
    ds = Dataset.from_list(make_rows(per_persona=2))
    args = codebook_args(tmp_path, compile_layers=True, warmup_epochs=0, max_steps=2, loss_log=False)
    before = snapshot(model)
    trainer = build_codebook_trainer(model, tokenizer, ds, args)
    trainer.add_callback(Spy())
    compute_loss = trainer.compute_loss
    monkeypatch.setattr(
        trainer, "compute_loss", lambda m, *a, **k: in_steps.append(compiled(m)) or compute_loss(m, *a, **k)
    )
    trainer.train()
    assert in_steps == [True, True] and in_callbacks == [False, False]  # compiled in training steps only
    assert trainer.loss_options().compiled_head and len(heads) == 2  # and the head with its loss, at every step
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))  # eager again after
    assert all(not torch.equal(before[k], v) for k, v in snapshot(model).items())
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)
    trainer.save_model(str(tmp_path))
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and not any("_orig_mod" in key for key in saved)
    with pytest.raises(ValueError, match="`compile_layers` and `torch_compile` both"):
        codebook_args(tmp_path, compile_layers=True, torch_compile=True)


@needs_compiler
def test_compile_scope_body_compiles_the_body_in_training_steps_only(tokenizer, tmp_path, monkeypatch):
    import peft_personamux.loss as loss_module

    calls: list[str] = []  # one entry per compiled body call, tagged with where it ran
    where = ["step"]
    run_body = loss_module.run_body
    monkeypatch.setattr(loss_module, "run_body", lambda *a, **k: calls.append(where[0]) or run_body(*a, **k))

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            where[0] = "after"  # the evaluation below runs outside training steps

        def on_step_begin(self, args, state, control, **kwargs):
            where[0] = "step"

    model = make_model(tokenizer)
    ds = Dataset.from_list(make_rows(per_persona=2))
    args = codebook_args(
        tmp_path,
        compile_layers=True,
        compile_scope="body",
        warmup_epochs=0,
        max_steps=2,
        loss_log=False,
        eval_strategy="steps",
        eval_steps=1,
    )
    before = snapshot(model)
    trainer = build_codebook_trainer(model, tokenizer, ds, args, eval_dataset=ds)
    trainer.add_callback(Spy())
    trainer.train()
    options = trainer.loss_options()
    assert options.compiled_body and options.compiled_head
    assert calls and set(calls) == {"step"}  # every training step's body compiled; evaluation's eager
    assert any("eval_loss" in e for e in trainer.state.log_history)
    assert all(not torch.equal(before[k], v) for k, v in snapshot(model).items())
    with pytest.raises(ValueError, match="`compile_scope` must be one of"):
        codebook_args(tmp_path, compile_layers=True, compile_scope="model")
    with pytest.raises(ValueError, match="`compile_scope='body'` does not combine with activation checkpointing"):
        codebook_args(tmp_path, compile_layers=True, compile_scope="body", gradient_checkpointing=True)


def test_checkpoints_hold_persona_files_and_resume_restores_them(tokenizer, tmp_path, monkeypatch):
    import peft_personamux.loss as loss_module

    ds = Dataset.from_list(make_rows(per_persona=2))  # 4 rows, batch 2: 2 steps per epoch
    common = {"per_device_train_batch_size": 2, "warmup_epochs": 0.5, "save_strategy": "steps", "save_steps": 3}
    straight = make_model(tokenizer)
    # autocast="auto" times this CPU's bf16 matmul: the first run measures bf16 as faster, the resumed run (as if
    # in a new process on a busy CPU) as slower; the resume must keep the checkpoint's choice
    monkeypatch.setattr(loss_module, "bf16_matmul_speedup", lambda: 2.0)
    first = build_codebook_trainer(straight, tokenizer, ds, codebook_args(tmp_path / "a", **common))
    first.train()
    assert first.loss_options().autocast_dtype is torch.bfloat16
    monkeypatch.setattr(loss_module, "bf16_matmul_speedup", lambda: 1.0)
    checkpoint = tmp_path / "a" / "checkpoint-3"
    files = list_persona_files(checkpoint)
    assert sorted(files) == ["play/a", "play/b"]
    # resume into a fresh copy of the base model whose adapter holds other values: W and b come back from the
    # adapter file, the mixture table from the persona files
    resumed = make_model(tokenizer)
    with torch.no_grad():
        for param in (layer_of(resumed).personamux_codebook["default"], layer_of(resumed).personamux_bias["default"]):
            param.normal_()
    trainer = build_codebook_trainer(resumed, tokenizer, ds, codebook_args(tmp_path / "b", **common))
    trainer._load_from_checkpoint(str(checkpoint))
    for name in files:
        saved = resumed.get_mixture(name)
        assert saved.any()  # trained past the warm-up
        assert torch.equal(saved, load_file(files[name])["mixture"])
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 4
    assert trainer.loss_options().autocast_dtype is torch.bfloat16  # the checkpoint's choice, not a new timing
    records = [e[FAST_LOSS_KEY] for e in trainer.state.log_history if FAST_LOSS_KEY in e]
    assert records == [{"autocast": "bfloat16", "device": "cpu", "mode": "auto"}]  # one record: the choice held
    final, expected = snapshot(resumed), snapshot(straight)
    for key in final:
        torch.testing.assert_close(final[key], expected[key], rtol=1e-4, atol=1e-6)


def test_fast_loss_record_follows_a_changed_precision_and_rejects_a_foreign_one(tokenizer, tmp_path, monkeypatch):
    """A resume that changes precision records it, so the next `auto` resume keeps that; a bad record is named."""
    import peft_personamux.loss as loss_module

    monkeypatch.setattr(loss_module, "bf16_matmul_speedup", lambda: 2.0)  # `auto` would pick bf16 if it timed
    ds = Dataset.from_list(make_rows(per_persona=2))
    trainer = build_codebook_trainer(make_model(tokenizer), tokenizer, ds, codebook_args(tmp_path, warmup_epochs=0))

    def choose(autocast: str) -> torch.dtype | None:
        trainer.args.autocast, trainer._loss_options = autocast, None  # as `train()` does before a run
        return trainer.loss_options().autocast_dtype

    assert choose("auto") is torch.bfloat16  # a fresh run times the CPU
    assert choose("no") is None  # resumed in float32 on purpose: a second record
    assert choose("auto") is None  # the last segment's choice, not a new timing
    records = [
        (e[FAST_LOSS_KEY]["autocast"], e[FAST_LOSS_KEY]["mode"])
        for e in trainer.state.log_history
        if FAST_LOSS_KEY in e
    ]
    assert records == [("bfloat16", "auto"), (None, "no")]
    trainer.state.log_history.append({FAST_LOSS_KEY: {"autocast": "bfloat16", "device": "cuda"}, "step": 1})
    assert choose("auto") is None  # a segment on another device: this CPU's last choice still holds
    trainer.state.log_history.append({FAST_LOSS_KEY: {"autocast": "float8", "device": "cpu"}, "step": 2})
    with pytest.raises(ValueError, match="personamux_fast_loss.autocast.*'float8'"):
        choose("auto")
    trainer.state.log_history.append({FAST_LOSS_KEY: "bfloat16", "step": 3})  # not a record at all
    with pytest.raises(ValueError, match="personamux_fast_loss.autocast.*'bfloat16'"):
        choose("auto")


def test_stage2_trains_only_new_rows_full_batch(tokenizer, tmp_path):
    model = make_model(tokenizer)
    model.add_personas(["play/a", "play/b"], mixtures=torch.randn(2, 4))
    model.freeze()
    new = Dataset.from_list(make_rows(personas=("other/c", "other/d"), per_persona=3))
    start = snapshot(model)
    snaps = Snapshots()
    trainer = build_fit_trainer(model, tokenizer, new, fit_args(tmp_path), callbacks=[snaps])
    assert trainer.args.per_device_train_batch_size == 6 and trainer.args.gradient_accumulation_steps == 1
    assert len(trainer.get_train_dataloader()) == 1  # all examples in one batch
    trainer.train()
    history = trainer.state.log_history
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4]
    assert trainer.state.epoch == 4.0  # one step = one pass over every example
    rows = [model.persona_index(n) for n in ("other/c", "other/d")]
    for snap in snaps.steps:
        assert torch.equal(snap["codebook"], start["codebook"]) and torch.equal(snap["bias"], start["bias"])
        assert torch.equal(snap["mixture"][:2], start["mixture"][:2])  # the old personas do not move
    assert snaps.steps[-1]["mixture"][rows].abs().sum(-1).gt(0).all()


def test_full_batch_arguments_split_with_accumulation(tmp_path):
    args = fit_args(tmp_path, max_micro_batch_size=4)
    split = full_batch_arguments(args, 10)
    assert (split.per_device_train_batch_size, split.gradient_accumulation_steps) == (4, 3)
    assert full_batch_arguments(fit_args(tmp_path), 10).per_device_train_batch_size == 10
    with pytest.raises(ValueError, match="empty"):
        full_batch_arguments(args, 0)


@pytest.mark.parametrize("fit_method", ["adam", "fisher", "lbfgs"])
def test_fit_personas_reports_heldout_loss_and_writes_files(tokenizer, tmp_path, fit_method):
    model = make_model(tokenizer)
    model.add_personas(["play/a"], mixtures=torch.randn(1, 4))
    kept = model.get_mixture("play/a")
    train = Dataset.from_list(make_rows(personas=("other/c", "other/d"), per_persona=3))
    heldout = Dataset.from_list(make_rows(personas=("other/c", "other/d"), per_persona=2))
    args = fit_args(tmp_path, max_steps=8, fit_method=fit_method, fisher_steps=3, lbfgs_steps=3)
    results = fit_personas(model, tokenizer, train, args, heldout, save_dir=tmp_path / "cb")
    assert torch.equal(model.get_mixture("play/a"), kept)
    assert sorted(results) == ["other/c", "other/d"]
    for result in results.values():
        assert result["train_examples"] == 3 and result["eval_examples"] == 2
        assert result["loss_after"] < result["loss_before"]
        assert os.path.isfile(result["file"]) and result["file"].startswith(str(tmp_path / "cb"))
    assert sorted(list_persona_files(tmp_path / "cb")) == ["other/c", "other/d"]


def test_fit_start_mean_starts_new_personas_at_the_codebook_personas_mean(tokenizer, tmp_path):
    from peft_personamux.training.stages import register_for_fit

    train = Dataset.from_list(make_rows(personas=("other/c",), per_persona=2))
    with pytest.raises(ValueError, match="fit_start='zero'"):  # no persona files beside the codebook
        register_for_fit(make_model(tokenizer), train, fit_args(tmp_path, fit_start="mean"))
    model = make_model(tokenizer)
    mixtures = torch.randn(2, 4)
    model.add_personas(["play/a", "play/b"], mixtures=mixtures)
    model.save_pretrained(tmp_path / "cb")  # with the persona files of play/a and play/b
    assert register_for_fit(model, train, fit_args(tmp_path, fit_start="mean")) == ["other/c"]
    torch.testing.assert_close(model.get_mixture("other/c").float(), mixtures.mean(0))
    register_for_fit(model, train, fit_args(tmp_path))  # the paper's start
    assert not model.get_mixture("other/c").any()


def test_evaluate_loss_matches_the_model_loss(tokenizer):
    model = make_model(tokenizer)
    model.add_personas(["play/a", "play/b"], mixtures=torch.randn(2, 4))
    ds = Dataset.from_list(make_rows())
    collator = PersonaMuxCollator.for_model(model, tokenizer)
    for scale in (1.0, 0.0):
        losses = evaluate_loss(model, tokenizer, ds, ["play/b"], bias_scale=scale, batch_size=3)
        rows = [r for r in ds if r["persona"] == "play/b"]
        with torch.no_grad():  # the model's loss is the mean over every label token of the batch
            expected = model(**collator(rows), bias_scale=scale).loss
        assert list(losses) == ["play/b"]
        assert losses["play/b"] == pytest.approx(float(expected), abs=1e-5)
    with pytest.raises(ValueError, match="no rows"):
        evaluate_loss(model, tokenizer, ds, ["nobody/x"])


def test_stage_switch_callback_validates():
    with pytest.raises(ValueError, match="`warmup_epochs`"):
        StageSwitchCallback(-0.5)


DDP_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
from datasets import Dataset
from tiny_models import make_mux_model as make_model, make_rows, make_tokenizer
from peft_personamux.training import CodebookTrainingArguments, PersonaFitArguments, fit_personas, pretrain_codebook

out = {out!r}
tok = make_tokenizer()
model = make_model(tok)
common = dict(disable_tqdm=True, report_to="none", logging_steps=1, use_cpu=True, seed=0)
args = CodebookTrainingArguments(
    output_dir=out, per_device_train_batch_size=2, num_train_epochs=2, save_steps=2, **common
)
trainer = pretrain_codebook(model, tok, Dataset.from_list(make_rows(per_persona=4)), args)
fit = PersonaFitArguments(output_dir=os.path.join(out, "fit"), max_steps=2, **common)
new = Dataset.from_list(make_rows(personas=("other/c",), per_persona=3))
results = fit_personas(model, tok, new, fit, new, save_dir=out)
mixture = model.get_mixture("play/a").tolist()
with open(os.path.join(out, f"rank{{args.process_index}}.json"), "w") as f:
    json.dump(dict(world=args.world_size, steps=trainer.state.global_step, mixture=mixture, results=results), f)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# 25-30 s alone on 2 cores (two interpreters import torch): part of the default run, as the issue asks
def test_two_process_cpu_run(tmp_path):
    """Both stages in 2 CPU processes (DDP over gloo), unchanged code.

    `accelerate launch --cpu --num_processes 2` starts several processes only through MPI (`--mpirun_hostfile`);
    `--multi_gpu` selects the torchrun launcher, and `use_cpu=True` in the arguments keeps the run on the CPU.
    """
    script = tmp_path / "run.py"
    tests = os.path.dirname(os.path.abspath(__file__))
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(tests=tests, out=str(tmp_path / "out"))))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launch = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    # 8 rows, 2 per device and 2 devices: 2 steps per epoch, 2 epochs
    assert [r["steps"] for r in ranks] == [4, 4]
    assert ranks[0]["mixture"] == ranks[1]["mixture"] and any(ranks[0]["mixture"])  # replicas stayed in sync
    assert ranks[0]["results"]["other/c"]["file"] and ranks[1]["results"]["other/c"]["file"] is None
    assert sorted(list_persona_files(tmp_path / "out")) == ["other/c", "play/a", "play/b"]
    assert sorted(list_persona_files(tmp_path / "out" / "checkpoint-2")) == ["play/a", "play/b"]
