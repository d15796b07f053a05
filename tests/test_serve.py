"""`personamux serve`: the real server on 127.0.0.1, called with the official `openai` client (tiny random model).

Covers plain and streamed completions, /v1/models, batching (8 concurrent personas equal to each alone), the
prefix cache against `model.generate`, uploads, errors, the queue limit, disconnects and a bounded soak.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from safetensors.torch import save_file  # noqa: E402
from tiny_models import PERSONAS, make_codebook  # noqa: E402

from peft_personamux.codebook_loading import load_codebook_model, read_codebook_info  # noqa: E402
from peft_personamux.conversation import encode_conversation  # noqa: E402
from peft_personamux.persona_files import write_persona_file  # noqa: E402
from peft_personamux.server import ServeArguments, build_app  # noqa: E402

HI = [{"role": "user", "content": "Is this the night?"}]


@contextlib.contextmanager
def running_server(app):
    """Run ``app`` with uvicorn on a free 127.0.0.1 port in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("The test server did not start.")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def codebook(tmp_path_factory):
    return make_codebook(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def loaded(codebook):
    model_dir, codebook_dir = codebook
    model, tokenizer = load_codebook_model(codebook_dir, str(model_dir))
    return model, tokenizer, read_codebook_info(codebook_dir)


@pytest.fixture(scope="module")
def server(loaded, tmp_path_factory):
    model, tokenizer, info = loaded
    args = ServeArguments(
        persona_dir=str(tmp_path_factory.mktemp("uploads")),
        max_batch=8,
        batch_window_ms=100,
        max_queue=32,
        prefix_cache_size=4,
        max_tokens=8,
    )
    app = build_app(model, tokenizer, info, args)
    with running_server(app) as url:
        yield url, app


@functools.cache
def client(url: str, max_retries: int = 2) -> openai.OpenAI:
    """One client per server (building one loads TLS certificates: a second or more on a busy machine)."""
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=max_retries)


def ask(url: str, persona: str, messages=HI, **kwargs) -> str:
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", 8)
    response = client(url).chat.completions.create(model=persona, messages=messages, **kwargs)
    return response.choices[0].message.content


def raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), data


def test_models_lists_the_base_model_and_every_persona(server):
    url, _ = server
    ids = [m.id for m in client(url).models.list()]
    assert ids[0] == "tiny" and sorted(ids[1:]) == sorted(PERSONAS)


def test_plain_and_streamed_completions_agree(server):
    url, _ = server
    response = client(url).chat.completions.create(model="play/p0", messages=HI, max_tokens=6, temperature=0)
    choice = response.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant" and choice.message.content
    assert response.usage.completion_tokens == 6
    assert response.usage.total_tokens == response.usage.prompt_tokens + 6
    stream = client(url).chat.completions.create(
        model="play/p0", messages=HI, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6
    status, headers, data = raw(
        url,
        "POST",
        "/v1/chat/completions",
        json.dumps({"model": "play/p1", "messages": HI, "max_tokens": 3, "stream": True}).encode(),
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [line for line in data.decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_greedy_answer_equals_model_generate(server, loaded):
    """The server's own decoding (cached prefix, padded batch) gives the tokens `generate` gives."""
    url, _ = server
    model, tokenizer, info = loaded
    placeholder = model.peft_config["default"].placeholder_token_id
    for persona, bias in (("play/p2", 1.0), ("play/p3", 0.0), (None, 1.0)):
        encoded = encode_conversation(
            tokenizer, HI, placeholder, info.text_personas.get(persona), info.instruction, persona is not None
        )
        ids = torch.tensor([encoded.input_ids])
        with torch.no_grad():
            if persona is None:
                with model.disable_adapter():
                    out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
            else:
                out = model.generate(
                    input_ids=ids, persona_ids=[persona], bias_scale=bias, max_new_tokens=8, do_sample=False
                )
        expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        for _ in range(2):  # a prefix-cache miss, then a hit
            assert ask(url, persona or "tiny", max_tokens=8, extra_body={"bias_scale": bias}) == expected


def test_text_persona_from_the_codebook_and_from_the_request(server):
    url, _ = server
    default = ask(url, "play/p0")
    assert ask(url, "play/p0", extra_body={"text_persona": "A grumpy old king."}) == default
    assert ask(url, "play/p0", extra_body={"text_persona": "A cheerful young page."}) != default


def test_concurrent_personas_are_batched_and_equal_to_alone(server):
    url, app = server
    engine = app.state.engine
    jobs = [(p, {"bias_scale": b}) for p, b in zip(PERSONAS[:8], (1.0, 0.5, 0.0, 1.0, 0.5, 0.0, 1.0, 0.5))]
    alone = [ask(url, p, max_tokens=10, extra_body=extra) for p, extra in jobs]
    sampled_alone = ask(url, "play/p1", max_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    before = dict(engine.stats)
    with ThreadPoolExecutor(9) as pool:
        futures = [pool.submit(ask, url, p, max_tokens=10, extra_body=extra) for p, extra in jobs]
        sampled = pool.submit(ask, url, "play/p1", max_tokens=10, temperature=0.9, top_p=0.9, seed=7)
        together = [f.result() for f in futures]
    assert together == alone
    assert sampled.result() == sampled_alone
    assert engine.stats["max_rows"] >= 4  # rows shared steps
    steps, row_steps = engine.stats["steps"] - before["steps"], engine.stats["row_steps"] - before["row_steps"]
    assert steps < row_steps / 2  # 9 requests x 9 decode steps took far fewer batched steps
    assert len(set(alone)) > 1  # different personas answer differently


def test_stop_strings_cut_the_answer(server):
    url, _ = server
    full = ask(url, "play/p4", max_tokens=12)
    stop = full[3:5]
    response = client(url).chat.completions.create(
        model="play/p4", messages=HI, max_tokens=12, temperature=0, stop=[stop]
    )
    assert response.choices[0].finish_reason == "stop"
    assert response.choices[0].message.content == full[: full.index(stop)]


def test_multi_turn_history(server):
    url, _ = server
    turns = HI + [{"role": "assistant", "content": "Ay, the night."}, {"role": "user", "content": "Good night."}]
    assert ask(url, "play/p0", messages=[{"role": "system", "content": "Be brief."}, *turns]) != ask(url, "play/p0")


def test_bad_requests_get_openai_errors(server):
    url, app = server
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        ask(url, "no/body")
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        ask(url, "play/p0", temperature=5)
    with pytest.raises(openai.UnprocessableEntityError, match="n"):
        ask(url, "play/p0", n=2)
    with pytest.raises(openai.BadRequestError, match="last message"):
        ask(url, "play/p0", messages=[*HI, {"role": "assistant", "content": "Ay."}])
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        ask(url, "play/p0", messages=[{"role": "user", "content": "night " * 600}])
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        ask(url, "play/p0", max_tokens=10_000)
    status, _, data = raw(url, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and json.loads(data)["error"]["code"] == "invalid_json"
    status, _, data = raw(url, "POST", "/v1/chat/completions", json.dumps({"model": "play/p0"}).encode())
    assert status == 422 and json.loads(data)["error"]["param"] == "messages"
    assert ask(url, "play/p0")  # still serving


def _persona_bytes(tmp_path, name: str, mixture: torch.Tensor, fingerprint: str) -> bytes:
    path = write_persona_file(str(tmp_path / "x.safetensors"), name, mixture, fingerprint)
    return open(path, "rb").read()


def test_upload_use_and_delete_a_persona(server, loaded, tmp_path):
    url, app = server
    model = loaded[0]
    fingerprint = model.codebook_fingerprint()
    data = _persona_bytes(tmp_path, "me/narrator", torch.randn(4), fingerprint)
    status, _, body = raw(url, "POST", "/v1/personas", data, {"Content-Type": "application/octet-stream"})
    assert status == 201 and json.loads(body)["id"] == "me/narrator"
    assert "me/narrator" in [m.id for m in client(url).models.list()]
    first = ask(url, "me/narrator")
    assert first
    # replacing it invalidates its cached prefix
    data = _persona_bytes(tmp_path, "me/narrator", torch.randn(4) * 3, fingerprint)
    assert raw(url, "POST", "/v1/personas", data)[0] == 201
    assert ask(url, "me/narrator") != first
    assert raw(url, "POST", "/v1/personas?name=me/renamed", data)[0] == 201

    status, _, body = raw(url, "DELETE", "/v1/personas/me/narrator")
    assert status == 200 and json.loads(body)["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        ask(url, "me/narrator")
    assert raw(url, "DELETE", "/v1/personas/me/narrator")[0] == 404
    assert raw(url, "DELETE", "/v1/personas/play/p0")[0] == 403  # the codebook's are read-only


@pytest.mark.parametrize(
    "case, match",
    [
        ("other_codebook", "fitted to codebook"),
        ("nan", "NaN"),
        ("wrong_size", "num_codes=4"),
        ("not_safetensors", "not a readable"),
        ("bad_name", "Invalid persona name"),
        ("shadows_codebook", "read-only"),
    ],
)
def test_bad_uploads_are_refused(server, loaded, tmp_path, case, match):
    url, _ = server
    fingerprint = loaded[0].codebook_fingerprint()
    if case == "other_codebook":
        data = _persona_bytes(tmp_path, "me/x", torch.randn(4), "0" * 16)
    elif case == "nan":
        path = tmp_path / "nan.safetensors"
        save_file(
            {"mixture": torch.tensor([float("nan")] * 4)},
            str(path),
            {"name": "me/x", "codebook_fingerprint": fingerprint},
        )
        data = path.read_bytes()
    elif case == "wrong_size":
        data = _persona_bytes(tmp_path, "me/x", torch.randn(7), fingerprint)
    elif case == "not_safetensors":
        data = b"hello"
    elif case == "bad_name":
        data = _persona_bytes(tmp_path, "me/x", torch.randn(4), fingerprint)
    else:
        data = _persona_bytes(tmp_path, "play/p0", torch.randn(4), fingerprint)
    path = "/v1/personas?name=../evil" if case == "bad_name" else "/v1/personas"
    status, _, body = raw(url, "POST", path, data)
    error = json.loads(body)["error"]
    assert status == (409 if case == "shadows_codebook" else 422), error
    assert match in error["message"] and "me/x" not in [m.id for m in client(url).models.list()]


def test_a_failing_row_does_not_break_its_batch(server, loaded, tmp_path):
    url, app = server
    engine, store = app.state.engine, app.state.personas
    data = _persona_bytes(tmp_path, "me/doomed", torch.randn(4), loaded[0].codebook_fingerprint())
    assert raw(url, "POST", "/v1/personas", data)[0] == 201
    expected = ask(url, "play/p5")
    with ThreadPoolExecutor(2) as pool:
        with engine.lock:  # the worker waits here with both requests taken or queued
            doomed = pool.submit(ask, url, "me/doomed")
            fine = pool.submit(ask, url, "play/p5")
            time.sleep(0.5)
            store.delete("me/doomed")  # gone before its prefix is built
        with pytest.raises(openai.NotFoundError, match="me/doomed"):
            doomed.result()
        assert fine.result() == expected


def test_queue_over_its_limit_answers_429_with_retry_after(loaded, tmp_path):
    model, tokenizer, info = loaded
    app = build_app(
        model,
        tokenizer,
        info,
        ServeArguments(persona_dir="", max_batch=1, max_queue=1, batch_window_ms=0, max_tokens=2),
    )
    engine = app.state.engine
    body = json.dumps({"model": "play/p0", "messages": HI, "max_tokens": 2, "temperature": 0}).encode()
    with running_server(app) as url, ThreadPoolExecutor(2) as pool:
        with engine.lock:
            first = pool.submit(raw, url, "POST", "/v1/chat/completions", body)
            _wait(lambda: engine._queue.unfinished_tasks == 1 and engine.queued == 0)  # taken by the worker
            second = pool.submit(raw, url, "POST", "/v1/chat/completions", body)
            _wait(lambda: engine.queued == 1)
            status, headers, data = raw(url, "POST", "/v1/chat/completions", body)
            assert status == 429 and headers["retry-after"] == "1"
            assert json.loads(data)["error"]["code"] == "queue_full"
        assert first.result()[0] == 200 and second.result()[0] == 200
        with pytest.raises(openai.RateLimitError):  # the openai client sees the same
            with engine.lock:
                pool.submit(raw, url, "POST", "/v1/chat/completions", body)
                _wait(lambda: engine.queued == 0 and engine._queue.unfinished_tasks == 3)
                pool.submit(raw, url, "POST", "/v1/chat/completions", body)
                _wait(lambda: engine.queued == 1)
                client(url, max_retries=0).chat.completions.create(model="play/p0", messages=HI, max_tokens=2)


def _wait(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the server")
        time.sleep(0.01)


def test_client_disconnect_frees_its_row(server):
    url, app = server
    engine = app.state.engine
    before = engine.stats["row_steps"]
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"model": "play/p6", "messages": HI, "max_tokens": 400, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.fp.readline()  # the first event
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    _wait(lambda: engine.running == 0 and engine.queued == 0)
    assert engine.stats["row_steps"] - before < 400
    assert ask(url, "play/p6")  # still serving


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_soak_memory_stays_flat(server):
    """60 requests over 9 personas (more than the 4 cached prefixes) in waves of 6: nothing piles up."""
    url, app = server
    engine = app.state.engine

    def wave(k: int) -> list[str]:
        with ThreadPoolExecutor(6) as pool:
            return list(
                pool.map(lambda i: ask(url, PERSONAS[(k + i) % len(PERSONAS)], temperature=0.8, seed=i), range(6))
            )

    for k in range(2):
        wave(k)
    start = _rss_mb()
    for k in range(10):
        assert all(isinstance(text, str) for text in wave(k))
    assert _rss_mb() - start < 40
    assert len(engine.prefix_cache) <= engine.prefix_cache.capacity == 4
    assert engine.running == 0 and engine.queued == 0 and engine._cache is None


def test_serve_benchmark_runs_tiny(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))
    threads = torch.get_num_threads()
    spec = importlib.util.spec_from_file_location("benchmark_serve", benchmarks / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        argv = ["--tiny", "--clients", "1,2", "--requests", "2", "--rounds", "2", "--no-cache-clients", "1"]
        payload = module.main(argv + ["--output-dir", str(tmp_path)])
        only = module.main(["--tiny", "--clients", "3", "--decode-step-only", "--output-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "serve.json").read_text())
    assert data["benchmark"] == "serve" and {"cpu", "cpu_cores"} <= set(data["hardware"])
    assert data["complete"] and data["rounds_done"] == 2
    modes = {(r["mode"], r["clients"]) for r in data["results"]}
    assert {("mixed", 2), ("one persona", 2), ("base", 2), ("mixed, no prefix cache", 1)} <= modes
    assert ("mixed, no prefix cache", 2) not in modes
    for row in data["results"]:
        assert row["rounds"] == 2 and row["requests"] == 2 * 2  # two requests per level and round
        assert row["new_tokens"] == row["requests"] * 8  # min_tokens held the length
        assert len(row["ratio_vs_base_by_round"]) == 2 and row["cpu_ms_per_token"] > 0
    steps = data["decode_step"]
    assert steps["persona"]["kv_length"] > steps["base"]["kv_length"] and steps["base"]["cpu_ms_per_step"] > 0
    assert only["settings"]["rows"] == 3 and set(only["decode_step"]) == {"base", "persona"}
    assert "cached positions" in (tmp_path / "serve_decode_step.md").read_text()
    assert "ratio vs base" in (tmp_path / "serve.md").read_text() and payload["ratios"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_readme_serve_snippet_on_smollm2(tmp_path):
    """`personamux serve` on the shipped codebook (real SmolLM2), called as the README shows."""
    import os
    import subprocess
    import sys

    from peft_personamux.codebook_loading import resolve_codebook_dir
    from peft_personamux.persona_files import list_persona_files

    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "peft_personamux.cli",
        "serve",
        "--port",
        str(port),
        "--persona_dir",
        str(tmp_path / "uploads"),
    ]
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            try:
                if raw(url, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "the server did not start in 10 minutes"
            time.sleep(1)
        ids = [m.id for m in client(url).models.list()]
        shipped = list_persona_files(resolve_codebook_dir(None))  # the base model, then every shipped persona
        assert ids[0] == "smollm2-135m-instruct" and "hamlet/hamlet" in ids and len(ids) == 1 + len(shipped)
        messages = [{"role": "user", "content": "Who goes there?"}]  # the README's request
        answer = ask(url, "hamlet/hamlet", messages, max_tokens=30, extra_body={"repetition_penalty": 1.1})
        assert answer.strip() and "AI" not in answer  # bias 1: in character, not the assistant persona
        half = ask(url, "hamlet/hamlet", messages, max_tokens=30, extra_body={"bias_scale": 0.5})
        assert half.strip() and half != answer
        personas = ["hamlet/hamlet", "hamlet/ophelia", "macbeth/macbeth", "romeo_and_juliet/juliet"]
        personas = [p for p in personas if p in ids][:4]
        alone = [ask(url, p, max_tokens=12) for p in personas]
        with ThreadPoolExecutor(len(personas)) as pool:
            assert list(pool.map(lambda p: ask(url, p, max_tokens=12), personas)) == alone
    finally:
        process.terminate()
        process.wait(60)
        log.close()
