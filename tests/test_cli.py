"""The `personamux` command: --help of every subcommand, and pretrain -> add-persona -> generate -> personas on a
tiny local model."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import make_workspace

from peft_personamux import cli
from peft_personamux.cli import common as cli_common
from peft_personamux.persona_files import list_persona_files, read_persona_file, write_persona_file

QUIET = ["--disable_tqdm", "True", "--report_to", "none"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny model folder, a persona dataset file and a file of lines."""
    return make_workspace(tmp_path_factory.mktemp("cli"), ("pa/a", "pa/b", "pb/c", "pc/d"))


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: personamux {command}")
    fields = {
        "pretrain": "--num_codes",
        "add-persona": "--lines_file",
        "generate": "--bias_scale",
        "personas": "--json",
        "demo": "--from_scratch",
        "chat": "--bias_scale",
        "serve": "--max_batch",
        "evaluate": "--num_unseen_personas",
    }
    assert fields[command] in out and "--model_name_or_path" in out or command == "personas"


def test_top_level_usage_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)
    assert cli.main([]) == 2
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, line",
    [
        (
            ["add-persona", "--personas", "x"],
            "personamux add-persona: unknown flag --personas (did you mean --persona?)",
        ),
        (
            ["generate", "--persona", "a", "--prompt", "b", "--bias_scal=1"],
            "unknown flag --bias_scal (did you mean --bias_scale?)",
        ),
        (["personas", "--zzz"], "personamux personas: unknown flag --zzz; see --help for the flags."),
        (["evaluate", "--quick", "--num_unseen_persona", "3"], "unknown flag --num_unseen_persona (did you mean"),
    ],
)
def test_unknown_flag_is_one_line_with_the_closest_flag(argv, line, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert line in err and len(err.splitlines()) == 1


def test_missing_codebook_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.setattr(cli_common, "default_codebook_dir", lambda: tmp_path / "pretrained" / "shakespeare")
    with pytest.raises(SystemExit, match="--from-scratch"):
        cli.main(["demo"])
    with pytest.raises(SystemExit, match="personamux pretrain"):
        cli.main(["personas", "--codebook", str(tmp_path)])


def test_pretrain_add_persona_generate_personas(workspace, tmp_path, capsys):
    model = ["--model_name_or_path", str(workspace / "tiny")]
    codebook = tmp_path / "codebook"
    code = cli.main(
        ["pretrain", *model, "--dataset", str(workspace / "data.jsonl"), "--pretrain_fraction", "0.5"]
        + ["--num_codes", "4", "--tokens_per_code", "2", "--num_bias_tokens", "2", "--output_dir", str(codebook)]
        + ["--num_train_epochs", "2", "--per_device_train_batch_size", "6", "--save_strategy", "no", *QUIET]
    )
    assert code == 0
    info = json.loads((codebook / cli.PRETRAIN_INFO_NAME).read_text())
    pretrained = sorted(list_persona_files(codebook))
    assert info["personas"] == len(pretrained) >= 1 and not set(pretrained) & set(info["unseen_personas"])
    assert "Pretrained a codebook" in capsys.readouterr().out

    fit = ["--max_steps", "3", "--logging_steps", "1", *QUIET]
    code = cli.main(
        ["add-persona", *model, "--codebook", str(codebook), "--lines_file", str(workspace / "lines.txt")]
        + ["--name", "me/narrator", "--num_eval", "1", "--output_dir", str(tmp_path / "logs"), *fit]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "Fitted persona 'me/narrator' on 2 examples" in out and "Held-out loss (1 examples)" in out
    assert "me/narrator" in list_persona_files(codebook)
    assert (tmp_path / "logs" / "loss_curve.png").is_file()

    unseen = info["unseen_personas"][0]
    code = cli.main(
        ["add-persona", *model, "--codebook", str(codebook), "--dataset", str(workspace / "data.jsonl")]
        + ["--persona", unseen, "--num_train", "4", "--num_eval", "2", "--save_dir", str(tmp_path / "mine"), *fit]
        + ["--output_dir", str(tmp_path / "logs2"), "--fit_method", "fisher", "--fisher_steps", "6"]
    )
    assert code == 0 and list(list_persona_files(tmp_path / "mine")) == [unseen]
    assert "Held-out loss (2 examples)" in capsys.readouterr().out
    assert not torch.equal(
        read_persona_file(list_persona_files(tmp_path / "mine")[unseen], 4, None)[1], torch.zeros(4)
    )

    code = cli.main(
        ["generate", *model, "--codebook", str(codebook), "--persona", "me/narrator", "--prompt", "Who?", "Where?"]
        + ["--bias_scale", "1", "0", "--max_new_tokens", "3"]
    )
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("[")] == [
        "[me/narrator | bias 1] Who?",
        "[me/narrator | bias 1] Where?",
        "[me/narrator | bias 0] Who?",
        "[me/narrator | bias 0] Where?",
    ]
    code = cli.main(
        ["generate", *model, "--codebook", str(codebook), "--persona", unseen, "--persona_dir", str(tmp_path / "mine")]
        + ["--prompt", "Who?", "--max_new_tokens", "2"]
    )
    assert code == 0 and f"[{unseen} | bias 1] Who?" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="Unknown persona"):
        cli.main(["generate", *model, "--codebook", str(codebook), "--persona", "no/body", "--prompt", "Hi"])
    alien = write_persona_file(str(tmp_path / "alien.safetensors"), "x/alien", torch.ones(4), "0123456789abcdef")
    with pytest.raises(SystemExit, match="was fitted to codebook '0123456789abcdef'"):
        cli.main(["generate", *model, "--codebook", str(codebook), "--persona", alien, "--prompt", "Hi"])

    assert cli.main(["personas", "--codebook", str(codebook), "--persona_dir", str(tmp_path / "mine"), "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["name"] for r in records) == sorted([*pretrained, "me/narrator", unseen])
    assert all(r["matches_codebook"] and r["bytes"] > 0 and r["norm"] >= 0 for r in records)
    assert cli.main(["personas", "--codebook", str(codebook)]) == 0
    assert "me/narrator" in capsys.readouterr().out


def test_add_persona_needs_one_source(workspace, tmp_path):
    codebook = tmp_path / "cb"
    codebook.mkdir()
    (codebook / "adapter_config.json").write_text("{}")
    with pytest.raises(SystemExit, match="exactly one of --lines_file"):
        cli.main(["add-persona", "--codebook", str(codebook), "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="needs --name"):
        cli.main(["add-persona", "--codebook", str(codebook), "--lines_file", str(workspace / "lines.txt")])


def test_demo_on_a_tiny_model(workspace, tmp_path, capsys):
    """The README's job end to end on Shakespeare with the tiny model: from scratch, then on the codebook it made."""
    sizes = ["--num_train", "3", "--num_eval", "2", "--steps", "2", "--num_prompts", "1", "--max_new_tokens", "2"]
    sizes += ["--scratch_personas", "2", "--scratch_lines", "4", "--scratch_epochs", "2", "--scratch_num_codes", "4"]
    common = ["--model_name_or_path", str(workspace / "tiny"), "--output_dir", str(tmp_path), *sizes]
    assert cli.main(["demo", "--from-scratch", *common]) == 0
    out = capsys.readouterr().out
    assert "Pretrained a small codebook (4 codes) on 2 characters x 4 lines" in out
    persona = out.split("Unseen character: ")[1].split(" ")[0]
    assert "Held-out loss: " in out and out.count("== bias scale") == 3 and "Demo finished in" in out
    assert list(list_persona_files(tmp_path)) == [persona]
    assert cli.main(["demo", "--codebook", str(tmp_path / "codebook"), *common]) == 0
    out = capsys.readouterr().out
    assert f"Unseen character: {persona}" in out and "(2 pretrained personas)" in out
    assert "at the start (the mean pretraining mixture)" in out  # --fit_start mean, the default on a codebook


def test_evaluate_subcommand_is_wired(capsys):
    from peft_personamux.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--help"])
    assert exit_info.value.code == 0
    assert "--num_unseen_personas" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert "evaluate" in capsys.readouterr().out


def test_pretrain_with_the_same_seed_gives_the_same_codebook(workspace, tmp_path):
    from safetensors.torch import load_file

    def run(name: str, seed: str) -> dict[str, torch.Tensor]:
        out = tmp_path / name
        code = cli.main(
            ["pretrain", "--model_name_or_path", str(workspace / "tiny"), "--dataset", str(workspace / "data.jsonl")]
            + ["--pretrain_fraction", "0.5", "--num_codes", "4", "--tokens_per_code", "2", "--num_bias_tokens", "2"]
            + ["--output_dir", str(out), "--max_steps", "2", "--save_strategy", "no", "--seed", seed, *QUIET]
        )
        assert code == 0
        return load_file(out / "adapter_model.safetensors")

    first, again, other = run("a", "3"), run("b", "3"), run("c", "4")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
