"""`loss.response_nll`: every shortcut gives the plain path's loss and gradients; `token_nll` against hand values."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import ARCHS, batch_for, mux, shared_batch_for, template_batch_for

from peft_personamux import shared_prompt, weight_casts
from peft_personamux.loss import (
    PLAIN,
    LossOptions,
    PrefixCache,
    bf16_matmul_speedup,
    choose_attention,
    choose_autocast,
    matmul_rate,
    mean_response_loss,
    response_nll,
    token_nll,
)

FAST_OPTIONS = [
    LossOptions(labels_only=True, prefix_cache=False, shared_prompt=False),
    LossOptions(labels_only=False, prefix_cache=True, shared_prompt=False),
    LossOptions(labels_only=True, prefix_cache=True, shared_prompt=False),
    LossOptions(labels_only=True, prefix_cache=True, attention="eager", shared_prompt=True),
    LossOptions(labels_only=True, prefix_cache=True, attention="sdpa", shared_prompt=True),
    LossOptions(labels_only=False, prefix_cache=False, shared_prompt=True),
]
SHARED = LossOptions(shared_prompt=True)
FAST_IDS = ["labels_only", "prefix", "both", "eager", "sdpa", "shared_prompt"]


def test_token_nll_matches_a_hand_computed_value():
    # vocabulary of 2, constant logits [0, ln 3]: p(token 1) = 3/4, p(token 0) = 1/4
    logits = torch.tensor([[[0.0, math.log(3.0)]] * 3])  # (1, 3, 2)
    labels = torch.tensor([[-100, 1, 0]])  # position 0 predicts label 1, position 1 predicts label 0
    nll = token_nll(logits, labels)
    assert nll.shape == (1, 2)
    assert nll[0, 0].item() == pytest.approx(-math.log(0.75))
    assert nll[0, 1].item() == pytest.approx(-math.log(0.25))
    assert token_nll(logits, torch.tensor([[-100, -100, -100]])).sum().item() == 0.0


def loss_and_grads(model, batch, options, cache=None):
    model.zero_grad()
    loss = mean_response_loss(model, batch, options=options, prefix_cache=cache)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("options", FAST_OPTIONS, ids=FAST_IDS)
@pytest.mark.parametrize(
    "make_batch", [batch_for, shared_batch_for, template_batch_for], ids=["distinct", "grouped", "template"]
)
def test_fast_paths_give_the_plain_loss_and_gradients(arch, options, make_batch):
    model = mux(arch)  # eval mode: GPT-2's dropout would make two passes differ
    batch = make_batch(model)
    plain_loss, plain_grads = loss_and_grads(model, batch, PLAIN)
    loss, grads = loss_and_grads(model, batch, options, PrefixCache())
    assert loss.item() == pytest.approx(plain_loss.item(), rel=1e-5)
    assert set(grads) == set(plain_grads) and len(grads) == 3  # codebook, bias, mixture table
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_path_equals_the_models_own_loss(arch):
    model = mux(arch)
    batch = batch_for(model)
    out = model(**batch)  # transformers' own causal-LM loss: the mean over label tokens
    assert mean_response_loss(model, batch, options=PLAIN).item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_per_row_values_and_mixture_override():
    model = mux("llama")
    batch = batch_for(model)
    plain, tokens = response_nll(model, batch, options=PLAIN)
    fast, fast_tokens = response_nll(model, batch, prefix_cache=PrefixCache())
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    assert fast_tokens.tolist() == tokens.tolist() == (batch["labels"][:, 1:] != -100).sum(-1).tolist()
    # a per-row mixture override equal to the table gives the same numbers; a different one does not
    table = model.base_model.model.get_input_embeddings().personamux_mixture["default"].detach()
    same, _ = response_nll(model, batch, mixtures=table[batch["persona_ids"]])
    torch.testing.assert_close(same, plain, rtol=1e-5, atol=1e-6)
    other, _ = response_nll(model, batch, mixtures=torch.zeros_like(table[batch["persona_ids"]]))
    assert not torch.allclose(other, plain)


def test_prefix_cache_reuses_entries_and_stays_bounded():
    model = mux("llama")
    batch = batch_for(model)
    cache = PrefixCache(max_entries=1)
    response_nll(model, batch, prefix_cache=cache)
    assert len(cache) == 1 and cache.misses >= 2  # two distinct prefixes, only one kept
    cache = PrefixCache()
    response_nll(model, batch, prefix_cache=cache)
    misses = cache.misses
    response_nll(model, batch, prefix_cache=cache)
    assert cache.misses == misses and cache.hits > 0
    with pytest.raises(ValueError, match="max_entries"):
        PrefixCache(0)


def test_bias_scale_zero_and_rows_without_prefix():
    model = mux("qwen2")
    batch = batch_for(model, with_prefix=(False, False, False, False))  # nothing to cache: plain body
    plain, _ = response_nll(model, batch, bias_scale=0.0, options=PLAIN)
    fast, _ = response_nll(model, batch, bias_scale=0.0)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_stays_close_to_float32():
    model = mux("llama")
    batch = batch_for(model)
    plain = mean_response_loss(model, batch, options=PLAIN)
    bf16 = mean_response_loss(model, batch, options=LossOptions(autocast_dtype=torch.bfloat16))
    assert bf16.item() == pytest.approx(plain.item(), rel=2e-2)


def test_matmul_rate_counts_flops_over_the_fastest_round(monkeypatch):
    import peft_personamux.machine as machine

    clock = iter([0.0, 4.0, 10.0, 12.0, 20.0, 23.0])  # rounds of 4, 2 and 3 seconds
    monkeypatch.setattr(machine.time, "perf_counter", lambda: next(clock))
    rate = matmul_rate(torch.float32, [(4, 3, 2), (2, 2, 2)], repeats=5, rounds=3)
    assert rate == (2 * 4 * 3 * 2 + 2 * 2 * 2 * 2) * 5 / 2.0  # FLOPs of all products over the 2-second round
    monkeypatch.undo()
    rates = {torch.float32: 100.0, torch.bfloat16: 250.0}
    calls = []
    monkeypatch.setattr(machine, "matmul_rate", lambda dtype, shapes, **kwargs: calls.append(dtype) or rates[dtype])
    bf16_matmul_speedup.cache_clear()
    try:
        assert bf16_matmul_speedup() == 2.5  # bf16's rate over float32's at the probe's shape
        rates[torch.bfloat16] = 110.0  # a later, noisier timing would fall under choose_autocast's 1.25
        assert bf16_matmul_speedup() == 2.5 and len(calls) == 2  # measured once per process: no second timing
        assert choose_autocast("cpu", "auto") is torch.bfloat16
    finally:
        bf16_matmul_speedup.cache_clear()  # later tests measure this CPU, not the stub


def test_choose_autocast_modes():
    assert choose_autocast("cpu", "no") is None
    assert choose_autocast("cpu", "bf16") is torch.bfloat16
    assert choose_autocast("cpu", "auto") in (None, torch.bfloat16)
    with pytest.raises(ValueError, match="autocast"):
        choose_autocast("cpu", "fp8")


def test_attention_switch_is_per_call_and_restored():
    model = mux("llama")
    config = model.base_model.model.config
    before = config._attn_implementation
    other = "eager" if before != "eager" else "sdpa"
    seen = []
    layer = model.base_model.model.model.layers[0].self_attn
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(module.config._attn_implementation))
    try:
        response_nll(model, batch_for(model), options=LossOptions(attention=other))
    finally:
        handle.remove()
    assert seen and set(seen) == {other}  # every pass (prefixes and rows) ran with the requested implementation
    assert config._attn_implementation == before  # and the model is as it was


def test_choose_attention_modes():
    assert choose_attention("cpu", torch.bfloat16) == "eager"
    assert choose_attention("cpu", None) is None  # float32: SDPA is the faster one
    assert choose_attention("cpu", torch.bfloat16, "model") is None
    assert choose_attention("cpu", None, "sdpa") == "sdpa"
    with pytest.raises(ValueError, match="`attention` must be one of .*got 'flash'"):
        choose_attention("cpu", None, "flash")


def spy_groups(monkeypatch) -> list[int]:
    """Record the number of groups each shared soft-prompt forward runs (none: the shared path was not taken)."""
    seen: list[int] = []
    real = shared_prompt.split_shared_prompt

    def spy(*args, **kwargs):
        seen.append(len(args[7]))  # representatives
        return real(*args, **kwargs)

    monkeypatch.setattr("peft_personamux.loss.split_shared_prompt", spy)
    return seen


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prompt_runs_once_per_prefix_and_persona(arch, monkeypatch):
    model = mux(arch)
    seen = spy_groups(monkeypatch)
    response_nll(model, shared_batch_for(model), options=LossOptions(shared_prompt=False))
    assert seen == []
    response_nll(model, shared_batch_for(model))  # on by default
    assert seen == [4]  # 8 rows: (prefix 0, persona 0) x3, (1, 1) x2, (2, 2) x2, (0, 1)
    seen.clear()
    response_nll(model, batch_for(model), options=SHARED)  # every row its own (prefix, persona): the plain split
    assert seen == []


def test_shared_prompt_with_mixture_overrides(monkeypatch):
    model = mux("llama")
    batch = shared_batch_for(model)
    seen = spy_groups(monkeypatch)
    table = model.base_model.model.get_input_embeddings().personamux_mixture["default"].detach()
    plain, _ = response_nll(model, batch, options=PLAIN)

    def grads(shared_mixtures: bool, copies: bool) -> torch.Tensor:
        per_persona = table.clone().requires_grad_(True)  # (personas, num_codes)
        rows = per_persona[batch["persona_ids"]]
        if copies:  # each row its own leaf: its gradient is that row's alone, so nothing may be shared
            rows = rows.detach().clone().requires_grad_(True)
        nll, _ = response_nll(model, batch, mixtures=rows, options=SHARED, shared_mixtures=shared_mixtures)
        torch.testing.assert_close(nll, plain, rtol=1e-5, atol=1e-5)
        nll.sum().backward()
        if copies:
            return torch.zeros_like(table).index_add(0, batch["persona_ids"], rows.grad)
        return per_persona.grad

    reference = grads(shared_mixtures=False, copies=True)
    assert seen == []
    torch.testing.assert_close(grads(shared_mixtures=True, copies=False), reference, rtol=1e-4, atol=1e-6)
    assert seen == [4]
    with torch.no_grad():  # no gradient: rows are grouped by value, so distinct overrides stay apart
        mixtures = table[batch["persona_ids"]].clone()
        mixtures[1] += 1.0
        split, _ = response_nll(model, batch, mixtures=mixtures, options=SHARED)
        alone, _ = response_nll(model, batch, mixtures=mixtures, options=PLAIN)
    torch.testing.assert_close(split, alone, rtol=1e-5, atol=1e-5)
    assert seen == [4, 5]


def test_can_share_prompt_needs_virtual_tokens_without_labels_and_a_rest():
    ph = 99
    ids = torch.tensor([[1, ph, ph, 3, 4], [ph, ph, 5, 6, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, -100, -100, 4], [-100, -100, -100, 6, -100]])
    starts = torch.tensor([1, 0])
    assert shared_prompt.can_share_prompt(ids, mask, labels, starts, 2, ph)
    assert not shared_prompt.can_share_prompt(ids, mask, labels, starts, 0, ph)  # no virtual tokens
    assert not shared_prompt.can_share_prompt(ids, mask, labels, starts, 3, ph)  # not all virtual
    early = labels.clone()
    early[1, 2] = 5  # the token right after the prompt is a label: its prediction is the prompt's last position
    assert not shared_prompt.can_share_prompt(ids, mask, early, starts, 2, ph)
    short = mask.clone()
    short[1, 2:] = 0  # nothing after the prompt
    assert not shared_prompt.can_share_prompt(ids, short, labels, starts, 2, ph)


def test_prompt_groups_by_prefix_persona_and_mixture():
    ids = torch.tensor([[1, 2, 9], [1, 2, 9], [1, 3, 9], [9, 0, 0], [1, 2, 9]])
    starts = torch.tensor([2, 2, 2, 0, 2])
    personas = torch.tensor([0, 0, 0, 0, 1])
    reps, groups = shared_prompt.prompt_groups(ids, starts, personas, None)
    assert reps == [0, 2, 3, 4] and groups.tolist() == [0, 0, 1, 2, 3]
    mixtures = torch.tensor([[0.0], [1.0], [0.0], [0.0], [0.0]])
    reps, groups = shared_prompt.prompt_groups(ids, starts, personas, mixtures)
    assert reps == [0, 1, 2, 3, 4] and groups.tolist() == [0, 1, 2, 3, 4]


def test_shared_run_lengths_stop_before_labels_and_keep_a_rest():
    # group 0: rows 0, 1 share [7, 8, 9] after the prompt, row 2 only [7]; group 1: rows 3, 4 share everything up
    # to their labels; group 2: one row without labels runs all but its last token in the head
    ids = torch.tensor(
        [
            [0, 0, 7, 8, 9, 1, 2],
            [0, 0, 7, 8, 9, 3, 4],
            [0, 0, 7, 5, 9, 3, 4],
            [0, 0, 7, 8, 9, 3, 4],
            [0, 0, 7, 8, 9, 3, 4],
            [0, 0, 7, 8, 9, 3, 4],
        ]
    )
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    labels[3:5, 5:] = ids[3:5, 5:]  # responses [3, 4]: the run must end before position 4, whose successor is a label
    starts = torch.zeros(6, dtype=torch.long)
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    assert shared_prompt.shared_run_lengths(ids, mask, labels, starts, 2, groups) == [1, 2, 4]
    groups = torch.tensor([0, 0, 1, 1, 1, 2])  # rows 0, 1 alone: identical tokens up to the last one they keep
    assert shared_prompt.shared_run_lengths(ids, mask, labels, starts, 2, groups)[0] == 3
    short = mask.clone()
    short[0, 3:] = 0  # row 0 ends right after [7]: nothing may run in the head, or it has no rest
    assert shared_prompt.shared_run_lengths(ids, short, labels, starts, 2, groups)[0] == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prompt_runs_the_common_template_once(arch, monkeypatch):
    model = mux(arch)
    batch = template_batch_for(model)
    runs: list[list[int]] = []
    real = shared_prompt.split_shared_prompt

    def spy(*args, **kwargs):
        runs.append(list(kwargs["common"]))  # common: per group, the tokens after the soft prompt run once
        return real(*args, **kwargs)

    monkeypatch.setattr("peft_personamux.loss.split_shared_prompt", spy)
    nll, _ = response_nll(model, batch, options=SHARED)
    # the instruction (5 tokens) for both groups of three; row 6 alone: instruction, prompt (1) and header but its
    # last token (1 of 2), whose successor is the first label
    assert runs == [[5, 5, 7]]
    torch.testing.assert_close(nll, response_nll(model, batch, options=PLAIN)[0], rtol=1e-5, atol=1e-5)


# precision -> (loss tolerance, gradient tolerance); bf16 runs compare packed and unpacked rows, both in bf16, and
# their gradients by relative norm (bf16 rounding alone gives about 5e-3 here; a wrong mask gives order 1)
PRECISIONS = {"float32": (1e-5, 1e-4), "bf16 autocast": (1e-4, 2e-2), "bf16 weights": (1e-4, 2e-2)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_packed_rows_give_the_unpacked_losses_and_gradients(arch, attention, precision, monkeypatch):
    """Packed rows under the 4D mask (its additive minimum in the weights' dtype for eager attention) against
    padded rows: the same losses and gradients, in float32 and in the bf16 that CPUs with bf16 units train in."""
    model = mux(arch)
    if precision == "bf16 weights":  # the frozen base in bf16, the adapter in float32 (`--dtype bfloat16`)
        for name, param in model.named_parameters():
            if "personamux" not in name:
                param.data = param.data.to(torch.bfloat16)
    autocast_dtype = torch.bfloat16 if precision == "bf16 autocast" else None
    loss_tol, grad_tol = PRECISIONS[precision]
    batch = template_batch_for(model)
    lines: list[int] = []
    real = shared_prompt.split_shared_prompt

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        lines.append(-1 if out[4] is None else out[0].shape[0])  # packed: one line per group
        return out

    monkeypatch.setattr("peft_personamux.loss.split_shared_prompt", spy)
    results = []
    for packed in (True, False):  # True: always, whatever the FLOPs
        options = LossOptions(attention=attention, shared_prompt=True, packed=packed, autocast_dtype=autocast_dtype)
        model.zero_grad()
        nll, tokens = response_nll(model, batch, options=options)
        nll.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((nll.detach(), tokens, grads))
    rows = batch["input_ids"].shape[0]  # packed: lines of several rows of one (prefix, persona) group; unpacked: none
    assert 3 <= lines[0] < rows and lines[1] == -1  # three groups, at least one line per group
    (packed_nll, packed_tokens, packed_grads), (nll, tokens, grads) = results
    torch.testing.assert_close(packed_nll, nll, rtol=loss_tol, atol=loss_tol)
    assert packed_tokens.tolist() == tokens.tolist()
    for name, grad in grads.items():
        if precision == "float32":
            torch.testing.assert_close(packed_grads[name], grad, rtol=grad_tol, atol=1e-6, msg=name)
        else:
            assert float((packed_grads[name] - grad).norm() / grad.norm()) < grad_tol, name


def test_packed_true_is_refused_where_rows_cannot_pack():
    with pytest.raises(ValueError, match="`packed=True`.*needs `shared_prompt=True`"):
        LossOptions(packed=True, shared_prompt=False)
    model = mux("llama")
    batch = template_batch_for(model)
    model.get_base_model().config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="`packed=True` needs attention 'eager' or 'sdpa'.*'flash_attention_2'"):
        response_nll(model, batch, options=LossOptions(packed=True))


def test_rows_are_packed_when_that_costs_fewer_flops():
    body = mux("llama").get_base_model().model
    one_group = torch.zeros(8, dtype=torch.long)
    uneven = torch.tensor([1, 1, 1, 1, 1, 1, 1, 12])  # padding to 12 wastes most of the rows' tokens
    assert shared_prompt.line_layout(body, uneven, one_group, past=4) == [list(range(8))]  # one line of 19
    even = torch.full((8,), 12)  # no padding to drop, and each token would attend across all 96 of the line
    assert shared_prompt.line_layout(body, even, one_group, past=4) is None
    assert shared_prompt.line_layout(body, even, one_group, past=4, always=True) is not None


def test_a_long_group_packs_into_several_balanced_lines():
    """Stage 2's full batch: one line of all rows would make attention span thousands of tokens, padded rows
    waste the padding; a few rows per line cost the least."""
    body = mux("llama").get_base_model().model
    pair = shared_prompt._pair_cost(body)
    spans = torch.tensor([3, 40] * 32)  # 64 rows of one group, short and long alternating
    layout = shared_prompt.line_layout(body, spans, torch.zeros(64, dtype=torch.long), past=20)
    assert layout is not None and 1 < len(layout) < 64
    assert sorted(r for line in layout for r in line) == list(range(64))  # every row once
    tokens = [int(spans[line].sum()) for line in layout]
    assert max(tokens) - min(tokens) <= 40  # balanced: no line longer than another by more than one row
    cost = shared_prompt._layout_cost
    chosen = cost(pair, len(layout), max(tokens), 20)
    assert chosen < cost(pair, 1, int(spans.sum()), 20)  # one line
    assert chosen < cost(pair, 64, 40, 20)  # padded rows


@pytest.mark.parametrize("arch", ARCHS)
def test_kept_casts_give_autocasts_numbers_and_put_the_weights_back(arch):
    """Frozen linear weights cast once and kept (`LossOptions.keep_casts`): bit for bit autocast's losses and
    gradients, every weight its own Parameter again after the call, and a weight changed in place cast again."""
    model = mux(arch)
    batch = template_batch_for(model)
    results = []
    for keep in (True, False):
        model.zero_grad()
        nll, _ = response_nll(model, batch, options=LossOptions(autocast_dtype=torch.bfloat16, keep_casts=keep))
        nll.sum().backward()
        results.append((nll.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (kept_nll, kept_grads), (nll, grads) = results
    assert torch.equal(kept_nll, nll)
    assert all(torch.equal(kept_grads[name], grad) for name, grad in grads.items())
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad]
    assert linears and all(isinstance(m.weight, torch.nn.Parameter) for m in linears)
    assert all(hasattr(m.weight, weight_casts._KEPT) for m in linears)  # the kept path ran
    weight = linears[0].weight
    first = weight_casts.cast_copy(weight, torch.bfloat16)
    assert weight_casts.cast_copy(weight, torch.bfloat16) is first
    with torch.no_grad():
        weight.mul_(2)  # in place: a new version
    again = weight_casts.cast_copy(weight, torch.bfloat16)
    assert again is not first and torch.equal(again, weight.detach().to(torch.bfloat16))
    weight.data = weight.data * 3  # new data, as subnetwork masks and `module.to` set it
    assert torch.equal(weight_casts.cast_copy(weight, torch.bfloat16), weight.detach().to(torch.bfloat16))
    weight_casts.drop_casts(model)
    assert not any(hasattr(m.weight, weight_casts._KEPT) for m in linears)


def test_kept_casts_swap_in_bf16_put_back_on_error_and_survive_inference_mode():
    """Inside the block the frozen linears hold bf16 copies (the copies are used, not just made); an exception puts
    the Parameters back; a copy made under inference mode still trains (it is an ordinary tensor)."""
    model = mux("llama")
    linear = next(m for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad)
    with weight_casts.kept_casts(model, torch.bfloat16):
        assert linear.weight.dtype is torch.bfloat16 and not isinstance(linear.weight, torch.nn.Parameter)
    assert isinstance(linear.weight, torch.nn.Parameter) and linear.weight.dtype is torch.float32
    with pytest.raises(RuntimeError, match="boom"), weight_casts.kept_casts(model, torch.bfloat16):
        raise RuntimeError("boom")
    assert isinstance(linear.weight, torch.nn.Parameter)
    weight_casts.drop_casts(model)
    batch, options = template_batch_for(model), LossOptions(autocast_dtype=torch.bfloat16)
    with torch.inference_mode():
        response_nll(model, batch, options=options)  # makes the copies under inference mode
    nll, _ = response_nll(model, batch, options=options)
    nll.sum().backward()  # would fail with "Inference tensors cannot be saved for backward"


def test_kept_casts_leave_linear_subclasses_alone():
    """A subclass of nn.Linear may compute in float32 on purpose (its own forward): it keeps its float32 weight."""

    class Float32Head(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(Float32Head(4, 4), torch.nn.Linear(4, 4)).requires_grad_(False)
    with weight_casts.kept_casts(model, torch.bfloat16):
        assert model[0].weight.dtype is torch.float32 and model[1].weight.dtype is torch.bfloat16


@pytest.mark.parametrize("arch", ARCHS)
def test_activation_checkpointing_runs_without_prefix_or_shared_prompt_reuse(arch):
    """transformers turns the key/value cache off under activation checkpointing, so the fast loss runs every row
    whole there: the plain path's losses, rows with a text persona before the soft prompt included."""
    model = mux(arch)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # transformers checkpoints only in training mode
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # GPT-2's dropout would make the two passes differ
    batch = batch_for(model)
    nll, tokens = response_nll(model, batch)  # FAST: prefix cache and shared prompt asked for
    plain, plain_tokens = response_nll(model, batch, options=PLAIN)
    torch.testing.assert_close(nll, plain, rtol=1e-5, atol=1e-5)
    assert tokens.tolist() == plain_tokens.tolist()
