"""Property-based fuzzing of persona files: byte flips, truncations and header edits.

Every outcome must be a load of exactly the saved values under the saved name, or a ``PersonaFileError`` /
``ValueError``; never another exception, and never a changed registry. Bounded (derandomised, a few dozen examples
per property) so that it stays fast in the default suite.
"""

from __future__ import annotations

import json
import os
import tempfile
from functools import cache

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from tiny_models import make_model

from peft_personamux import PersonaFileError, PersonaMuxConfig

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
NAME = "hamlet"


@cache
def setup():
    """An empty model, a model that already holds the persona, the saved values and the file's bytes."""
    config = dict(num_codes=6, tokens_per_code=3, num_bias_tokens=4, task_type="CAUSAL_LM")
    empty = get_peft_model(make_model("llama"), PersonaMuxConfig(**config))
    holder = get_peft_model(make_model("llama"), PersonaMuxConfig(**config))
    state = {k: v for k, v in empty.base_model.personamux_layer.state_dict().items() if "personamux_mixture" not in k}
    holder.base_model.personamux_layer.load_state_dict(state, strict=False)
    saved = torch.randn(6, generator=torch.Generator().manual_seed(3))
    holder.add_personas([NAME, "other"], mixtures=torch.stack([saved, -saved]))
    folder = tempfile.mkdtemp(prefix="persona-fuzz-")
    path = holder.save_persona(NAME, folder)
    with open(path, "rb") as f:
        data = f.read()
    return empty, holder, saved, data, folder


def snapshot(model):
    return model.personas, model.base_model.mixture_table("default").detach().clone(), model.active_persona


def check_load(data: bytes) -> None:
    empty, holder, saved, _, folder = setup()
    path = os.path.join(folder, "fuzzed.safetensors")
    with open(path, "wb") as f:
        f.write(data)
    for model in (empty, holder):
        before = snapshot(model)
        try:
            name = model.load_persona(path, activate=False)
        except (PersonaFileError, ValueError):
            after = snapshot(model)
            assert after[0] == before[0] and torch.equal(after[1], before[1]) and after[2] == before[2]
            continue
        assert name == NAME and torch.equal(model.get_mixture(NAME), saved)  # exactly the saved persona
        if model is empty:
            model.remove_persona(NAME)
        after = snapshot(model)
        assert after[0] == before[0] and torch.equal(after[1], before[1])


def split(data: bytes) -> tuple[dict, bytes]:
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def join(header: dict, body: bytes, pad: int = 0) -> bytes:
    text = json.dumps(header).encode() + b" " * pad
    return len(text).to_bytes(8, "little") + text + body


@FUZZ
@given(st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 7)), min_size=1, max_size=4))
def test_byte_flips(flips):
    data = bytearray(setup()[3])
    for position, bit in flips:
        data[position % len(data)] ^= 1 << bit
    check_load(bytes(data))


@FUZZ
@given(st.integers(min_value=0), st.binary(max_size=16))
def test_truncations_and_appended_bytes(keep, tail):
    data = setup()[3]
    check_load(data[: keep % len(data)] + tail)


EDITS = st.one_of(
    st.tuples(
        st.just("meta"),
        st.sampled_from(["name", "digest", "codebook_fingerprint", "num_codes", "format_version", "dtype", "format"]),
        st.text(max_size=70),
    ),
    st.tuples(
        st.just("drop_meta"),
        st.sampled_from(["name", "digest", "codebook_fingerprint", "num_codes", "format_version"]),
        st.none(),
    ),
    st.tuples(st.just("add_meta"), st.text(min_size=1, max_size=10), st.text(max_size=10)),
    st.tuples(st.just("dtype"), st.sampled_from(["F32", "F16", "BF16", "F64", "I32", "U8", "BOOL", "X"]), st.none()),
    st.tuples(st.just("shape"), st.lists(st.integers(-2, 12), max_size=3), st.none()),
    st.tuples(st.just("offsets"), st.lists(st.integers(-4, 40), max_size=3), st.none()),
    st.tuples(st.just("key"), st.text(max_size=8), st.none()),
    st.tuples(st.just("no_meta"), st.none(), st.none()),
)


@FUZZ
@given(st.lists(EDITS, min_size=1, max_size=3), st.integers(0, 8))
def test_header_edits(edits, pad):
    header, body = split(setup()[3])
    for kind, key, value in edits:
        meta = header.setdefault("__metadata__", {})
        tensor = next((v for k, v in header.items() if k != "__metadata__"), None)
        if kind == "meta":
            meta[key] = value
        elif kind == "drop_meta":
            meta.pop(key, None)
        elif kind == "add_meta":
            meta[key] = value
        elif kind == "no_meta":
            header.pop("__metadata__")
        elif tensor is None:
            continue
        elif kind == "dtype":
            tensor["dtype"] = key
        elif kind == "shape":
            tensor["shape"] = key
        elif kind == "offsets":
            tensor["data_offsets"] = key
        elif kind == "key":
            name = next(k for k in header if k != "__metadata__")
            header[key] = header.pop(name)
    check_load(join(header, body, pad))


def test_the_harness_sees_a_sound_file_load():
    """Control: the saved bytes, and the same header re-serialised with padding, load as the saved persona."""
    empty, _, saved, data, _ = setup()
    check_load(data)
    header, body = split(data)
    check_load(join(header, body, pad=5))
    folder = setup()[4]
    assert empty.load_persona(os.path.join(folder, "fuzzed.safetensors")) == NAME
    assert torch.equal(empty.get_mixture(NAME), saved)
    empty.remove_persona(NAME)
