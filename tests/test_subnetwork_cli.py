"""``personamux add-persona --method subnetwork`` on a tiny local model: lines file and dataset persona, errors."""

from __future__ import annotations

import pytest
from tiny_models import make_base, make_tokenizer, make_workspace

from peft_personamux import cli
from peft_personamux.subnetwork import ChannelMask, WeightMask, list_subnetwork_files
from peft_personamux.subnetwork.statistics import unwrap_model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("subnetwork_cli"), ("pa/a", "pb/b"))


def run(workspace, tmp_path, *extra):
    common = ["--model_name_or_path", str(workspace / "tiny"), "--save_dir", str(tmp_path / "out")]
    return cli.main(["add-persona", *common, "--method", "subnetwork", "--output_dir", str(tmp_path / "logs"), *extra])


def test_add_persona_subnetwork_from_lines_and_from_dataset(workspace, tmp_path, capsys):
    assert (
        run(
            workspace,
            tmp_path,
            "--lines_file",
            str(workspace / "lines.txt"),
            "--name",
            "me/narrator",
            "--num_eval",
            "1",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Calibrated the channel subnetwork of 'me/narrator' (sparsity 0.1) on 2 examples" in out
    assert "Held-out loss (1 examples)" in out and "with the mask" in out
    files = list_subnetwork_files(tmp_path / "out")
    assert list(files) == ["me/narrator"] and f"Saved {files['me/narrator']}" in out
    model = unwrap_model(make_base(make_tokenizer()))
    assert ChannelMask.load(files["me/narrator"], model).metadata["sparsity"] == "0.1"

    extra = [
        "--persona",
        "pa/a",
        "--num_train",
        "4",
        "--num_eval",
        "2",
        "--granularity",
        "weight",
        "--sparsity",
        "0.3",
    ]
    assert run(workspace, tmp_path, "--dataset", str(workspace / "data.jsonl"), *extra) == 0
    out = capsys.readouterr().out
    assert "weight subnetwork of 'pa/a' (sparsity 0.3) on 4 examples" in out
    weight_files = list_subnetwork_files(tmp_path / "out", "weight")
    assert WeightMask.load(weight_files["pa/a"], model).metadata["granularity"] == "weight"


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--sparsity", "1.5"], "--sparsity must be strictly between 0 and 1, got 1.5"),
        (["--sparsity", "0"], "--sparsity must be strictly between 0 and 1, got 0.0"),
        (["--granularity", "rows"], "--granularity must be one of 'weight', 'channel'"),
        (["--method", "lasso"], "--method must be 'mixture' or 'subnetwork', got 'lasso'"),
    ],
)
def test_add_persona_subnetwork_errors(workspace, tmp_path, flags, match):
    with pytest.raises(SystemExit, match=match):
        run(workspace, tmp_path, "--lines_file", str(workspace / "lines.txt"), "--name", "me/x", *flags)
