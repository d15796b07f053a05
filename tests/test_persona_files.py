"""Persona files cannot silently change: content digests, format 1 files, no silent replacement, --verify, and the
checks on the adapter file."""

from __future__ import annotations

import functools
import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import ARCHS, DTYPES, SMALL, make_model
from tiny_models import mux as tiny_mux

import peft_personamux.persona_files as pf
from peft_personamux import PersonaFileError, PersonaMuxConfig, cli

mux = functools.partial(tiny_mux, personas=("hamlet", "ophelia"))


def copy_codebook(source, target):
    """Give ``target`` the codebook and bias of ``source`` (so that their persona files fit both)."""
    state = {k: v for k, v in source.base_model.personamux_layer.state_dict().items() if "personamux_mixture" not in k}
    target.base_model.personamux_layer.load_state_dict(state, strict=False)


def registry(model):
    """Everything a load may change: names, rows, the active persona."""
    return model.personas, model.base_model.mixture_table("default").detach().clone(), model.active_persona


def assert_unchanged(model, before):
    names, table, active = registry(model)
    assert names == before[0] and active == before[2] and torch.equal(table, before[1])


def header(path):
    data = open(path, "rb").read()
    return json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])


def write_v1(path, name, mixture, fingerprint):
    """A persona file exactly as peft-personamux 0.1.0 wrote it (no digest)."""
    metadata = {
        "format": "peft-personamux/persona",
        "format_version": "1",
        "name": name,
        "num_codes": str(mixture.numel()),
        "dtype": "float32",
        "codebook_fingerprint": fingerprint,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"mixture": mixture.float().contiguous()}, str(path), metadata=metadata)
    return str(path)


@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(pf, "_warned_no_digest", False)


# -- digest ----------------------------------------------------------------------------------------------------------


def test_files_carry_a_digest_that_is_verified(tmp_path):
    model = mux()
    path = model.save_persona("hamlet", tmp_path)
    tensors, meta = load_file(path), header(path)["__metadata__"]
    assert meta["format_version"] == "2" and len(meta["digest"]) == 64
    assert meta["digest"] == pf.persona_digest("hamlet", tensors["mixture"], model.codebook_fingerprint())
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0x01  # one bit of one float: still 6 finite floats of the right shape
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(data))
    fresh = mux(personas=())
    copy_codebook(model, fresh)
    before = registry(fresh)
    with pytest.raises(PersonaFileError, match="digest does not match: the file is damaged"):
        fresh.load_persona(str(damaged))
    assert_unchanged(fresh, before)


@pytest.mark.parametrize("field, value", [("name", "ophelia"), ("codebook_fingerprint", "0" * 16)])
def test_edited_metadata_is_caught(tmp_path, field, value):
    model = mux()
    path = model.save_persona("hamlet", tmp_path)
    metadata = header(path)["__metadata__"]
    metadata[field] = value
    edited = tmp_path / "edited.safetensors"
    save_file(load_file(path), str(edited), metadata=metadata)
    before = registry(model)
    with pytest.raises(PersonaFileError, match="damaged"):
        model.load_persona(str(edited), strict=False)
    assert_unchanged(model, before)


def test_format_1_files_load_with_one_warning(tmp_path, fresh_warning):
    model = mux()
    mixture = torch.randn(6)
    old = [
        write_v1(tmp_path / f"p{i}.safetensors", f"old{i}", mixture * i, model.codebook_fingerprint()) for i in (1, 2)
    ]
    with pytest.warns(UserWarning, match="no content digest"):
        assert model.load_persona(old[0]) == "old1"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.load_persona(old[1]) == "old2"  # shown once
    assert torch.equal(model.get_mixture("old2"), mixture * 2)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_adapter_written_the_old_way_still_loads(tmp_path, arch, dtype, fresh_warning):
    """An adapter folder as 0.1.0 saved it: the same adapter file, and format 1 persona files."""
    model = mux(arch, dtype)
    model.save_pretrained(tmp_path)
    for name in model.personas:  # rewrite the persona files the old way
        write_v1(pf.persona_path(tmp_path, name), name, model.get_mixture(name), model.codebook_fingerprint())
    loaded = PeftModel.from_pretrained(make_model(arch, dtype), tmp_path)
    with pytest.warns(UserWarning, match="no content digest"):
        loaded.load_persona("hamlet", activate=False)
    loaded.load_persona("ophelia", activate=False)
    ids = torch.randint(3, 100, (2, 6))
    expected = model(input_ids=ids, persona_ids=["ophelia", "hamlet"]).logits
    torch.testing.assert_close(
        loaded(input_ids=ids, persona_ids=["ophelia", "hamlet"]).logits, expected, atol=0, rtol=0
    )


def test_state_dict_with_the_old_table_name_loads():
    model = mux()
    state = {k.replace(".personamux_mixture.", ".mixture."): v for k, v in model.base_model.model.state_dict().items()}
    assert any(k.endswith(".mixture.default") for k in state)
    other = mux()
    with torch.no_grad():
        other.base_model.personamux_layer.personamux_mixture["default"].zero_()
    result = other.base_model.model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(other.get_mixture("hamlet"), model.get_mixture("hamlet"))


# -- no silent replacement -------------------------------------------------------------------------------------------


def test_load_never_silently_replaces_a_registered_persona(tmp_path):
    model = mux()
    other = mux(personas=("hamlet",))  # another "hamlet" on the same codebook
    copy_codebook(model, other)
    other.set_mixture("hamlet", torch.arange(6.0))
    path = other.save_persona("hamlet", tmp_path / "elsewhere")
    renamed = tmp_path / "other.safetensors"
    renamed.write_bytes(open(path, "rb").read())
    before = registry(model)
    with pytest.raises(ValueError, match=r"'hamlet' is already registered.*other\.safetensors.*overwrite=True"):
        model.load_persona(str(renamed))
    assert_unchanged(model, before)
    assert model.load_persona(str(renamed), name="hamlet2") == "hamlet2"
    assert torch.equal(model.get_mixture("hamlet2"), torch.arange(6.0))
    assert torch.equal(model.get_mixture("hamlet"), before[1][0])
    assert model.load_persona(str(renamed), overwrite=True) == "hamlet"
    assert torch.equal(model.get_mixture("hamlet"), torch.arange(6.0)) and model.personas == [
        "hamlet",
        "ophelia",
        "hamlet2",
    ]
    assert model.load_persona(str(renamed)) == "hamlet"  # identical values: nothing to replace


def test_load_by_name_does_not_discard_values_in_memory(tmp_path):
    model = mux()
    model.save_pretrained(tmp_path)
    model.set_mixture("hamlet", torch.ones(6))  # changed after saving
    with pytest.raises(ValueError, match="already registered"):
        model.load_persona("hamlet")
    assert torch.equal(model.get_mixture("hamlet"), torch.ones(6))
    assert model.load_persona("ophelia") == "ophelia"  # same values as on disk
    model.load_persona("hamlet", overwrite=True)
    assert not torch.equal(model.get_mixture("hamlet"), torch.ones(6))


@pytest.mark.parametrize(
    "tensor, match",
    [
        (torch.zeros(5), "shape"),
        (torch.zeros(6, dtype=torch.int32), "floating point"),
        (torch.tensor([0, 0, 0, 0, 0, float("inf")]), "NaN or infinite"),
    ],
)
def test_failed_load_leaves_the_registry_unchanged(tmp_path, tensor, match):
    model = mux()
    model.set_persona("ophelia")
    bad = tmp_path / "bad.safetensors"
    save_file({"mixture": tensor}, str(bad), metadata={"name": "hamlet"})
    before = registry(model)
    with pytest.raises(PersonaFileError, match=match):
        model.load_persona(str(bad), overwrite=True)
    assert_unchanged(model, before)


def test_values_that_overflow_the_table_dtype_are_refused(tmp_path):
    model = get_peft_model(make_model("llama", torch.float16), PersonaMuxConfig(**SMALL), autocast_adapter_dtype=False)
    path = pf.write_persona_file(
        str(tmp_path / "big.safetensors"), "big", torch.full((6,), 1e6), model.codebook_fingerprint()
    )
    with pytest.raises(PersonaFileError, match="overflow"):
        model.load_persona(path)
    assert model.personas == []


# -- personamux personas --verify ------------------------------------------------------------------------------------


def test_cli_verify(tmp_path, capsys, fresh_warning):
    model = mux()
    model.save_pretrained(tmp_path)
    assert cli.main(["personas", "--verify", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["OK        hamlet", "OK        ophelia"] and "0 failed" in out[-1]
    write_v1(pf.persona_path(tmp_path, "old"), "old", torch.zeros(6), model.codebook_fingerprint())
    path = pf.persona_path(tmp_path, "hamlet")
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0x10
    open(path, "wb").write(bytes(data))
    assert cli.main(["personas", "--verify", str(tmp_path), "--json"]) == 1
    lines = {r["name"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert not lines["hamlet"]["ok"] and "damaged" in lines["hamlet"]["problem"]
    assert lines["ophelia"] == {"name": "ophelia", "ok": True, "problem": None}
    assert lines["old"]["ok"] and "no digest" in lines["old"]["problem"]


# -- the adapter file ------------------------------------------------------------------------------------------------


def _adapter_file(tmp_path):
    model = mux()
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    return path, load_file(str(path))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda v: v[:, :2], r"has shape \(6, 2, 32\).*expect the codebook"),
        (lambda v: v.to(torch.int32), "floating point"),
        (lambda v: v.index_fill(0, torch.tensor([0]), float("nan")), "NaN or infinite"),
    ],
)
def test_adapter_file_is_checked_on_load(tmp_path, edit, match):
    path, tensors = _adapter_file(tmp_path)
    key = next(k for k in tensors if "personamux_codebook" in k)
    tensors[key] = edit(tensors[key]).contiguous()
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(make_model("llama"), tmp_path)


def test_missing_adapter_weight_is_reported_but_not_the_table(tmp_path):
    path, tensors = _adapter_file(tmp_path)
    save_file({k: v for k, v in tensors.items() if "personamux_bias" not in k}, str(path))
    with pytest.warns(UserWarning, match="missing adapter keys") as caught:
        PeftModel.from_pretrained(make_model("llama"), tmp_path)
    message = " ".join(str(w.message) for w in caught)
    assert "personamux_bias" in message and "personamux_mixture" not in message
