"""The batching engine: one worker thread runs every request's tokens through one batched forward per step.

Requests wait in a bounded queue. When the engine is idle it waits ``batch_window_ms`` after the first request for
others; while it is decoding, new requests join at the next step (continuous batching) and finished or cancelled
rows leave. Each row brings its own persona, bias scale and sampling settings: the persona only shapes the row's
prefix (system turn, text persona, soft prompt, instruction), whose key/value cache is computed alone, once, and
kept in a bounded LRU (`PrefixCache`), so every later step is the base model's. transformers' ``generate`` has no
per-row temperature, seed, stop strings or prefix cache, hence this loop; it calls the model's own forward.

Computing each prefix alone, in one row, makes it identical whatever else is batched: a greedy request returns the
same text batched or alone (up to float rounding of the padded batch, which the tests check on exact text).
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .kv import KV, PrefixCache, concat_rows, kv_from_cache, kv_length, select_rows, to_cache
from .sampling import SamplingParams, TextTracker, make_generator, pick_token

logger = logging.getLogger(__name__)


@dataclass
class Event:
    """What the worker tells a request: a piece of text, the end, or an error."""

    kind: str  # "delta" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    status: int = 200


@dataclass
class GenerationRequest:
    persona: str | None  # None: the base model without a soft prompt
    bias_scale: float
    input_ids: list[int]  # from `encode_conversation`
    prefix_length: int  # ids[:prefix_length] are shared with other requests of the persona (cached)
    prompt_tokens: int  # positions the prompt takes, virtual tokens included
    sampling: SamplingParams
    emit: Callable[[Event], None]  # called from the worker thread
    cancelled: threading.Event = field(default_factory=threading.Event)


class QueueFull(RuntimeError):
    """More requests are waiting than ``max_queue``."""


@dataclass
class _Row:
    request: GenerationRequest
    tracker: TextTracker
    generator: torch.Generator
    seen: list[int]  # prompt and answer ids, for the repetition penalty
    pending: int = -1  # sampled, not yet fed to the model
    completion_tokens: int = 0


class BatchEngine:
    """Continuous batching of Persona-Mux requests over a ``PeftModel``; see the module docstring."""

    def __init__(
        self,
        model,
        tokenizer,
        max_batch: int = 8,
        batch_window_ms: float = 10.0,
        max_queue: int = 64,
        prefix_cache_size: int = 64,
    ) -> None:
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue)):
            if value < 1:
                raise ValueError(f"`{name}` must be at least 1, got {value}.")
        if batch_window_ms < 0:
            raise ValueError(f"`batch_window_ms` must be >= 0, got {batch_window_ms}.")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.batch_window = max_batch, batch_window_ms / 1000
        self.prefix_cache = PrefixCache(prefix_cache_size)
        self.lock = threading.RLock()  # held around every model call; persona uploads take it too
        self.stats = {"requests": 0, "steps": 0, "row_steps": 0, "max_rows": 0, "prefills": 0}
        self._base = model.get_base_model()  # its embedding writes no soft prompt unless the tuner asks
        self._device = next(model.parameters()).device
        self._queue: queue.Queue[GenerationRequest] = queue.Queue(maxsize=max_queue)
        self._versions: dict[str | None, int] = {}
        self._rows: list[_Row] = []
        self._cache = self._mask = self._positions = None
        eos = model.generation_config.eos_token_id
        self._eos = {
            t for t in ([eos] if isinstance(eos, int) else eos or []) + [tokenizer.eos_token_id] if t is not None
        }
        self._banned = [model.adapter_config().placeholder_token_id]  # as the tuner's generate does
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # transformers renamed `past_key_values` to `cache` (forward argument and output field)
        self._cache_arg = (
            "cache" if "cache" in inspect.signature(type(self._base).forward).parameters else "past_key_values"
        )

    # -- control -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="personamux-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, request: GenerationRequest) -> None:
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} requests are already waiting.") from None

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> int:
        return len(self._rows)

    def persona_changed(self, name: str) -> None:
        """A persona's mixture changed or it was removed: its cached prefixes are stale."""
        with self.lock:
            self._versions[name] = self._versions.get(name, 0) + 1
            self.prefix_cache.drop(name)

    # -- worker --------------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                new = self._collect()
                if new:
                    self._admit(new)
                self._drop_cancelled()
                if self._rows:
                    self._step()
            except Exception as err:  # a broken step fails its rows, never the server
                logger.exception("Generation step failed; failing %d running requests.", len(self._rows))
                for row in self._rows:
                    row.request.emit(Event("error", text=f"Generation failed: {err}", status=500))
                self._reset()

    def _collect(self) -> list[GenerationRequest]:
        free = self.max_batch - len(self._rows)
        items: list[GenerationRequest] = []
        if free <= 0:
            return items
        if self._rows:  # decoding already: join at this step without waiting
            while len(items) < free:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
        else:
            try:
                items.append(self._queue.get(timeout=0.05))
            except queue.Empty:
                return items
            deadline = time.monotonic() + self.batch_window
            while len(items) < free and (remaining := deadline - time.monotonic()) > 0:
                try:
                    items.append(self._queue.get(timeout=remaining))
                except queue.Empty:
                    break
        return [r for r in items if not r.cancelled.is_set()]

    def _prefix_kv(self, request: GenerationRequest) -> KV:
        ids = request.input_ids[: request.prefix_length]
        scale = request.bias_scale if request.persona is not None else 0.0
        key = (request.persona, self._versions.get(request.persona, 0), scale, tuple(ids))
        kv = self.prefix_cache.get(key)
        if kv is None:
            tensor = torch.tensor([ids], device=self._device)  # (1, prefix_length)
            if request.persona is None:
                out = self._base(input_ids=tensor, use_cache=True, logits_to_keep=1)
            else:
                out = self.model(
                    input_ids=tensor, persona_ids=[request.persona], bias_scale=scale, use_cache=True, logits_to_keep=1
                )
            kv = kv_from_cache(self._out_cache(out))
            self.prefix_cache.put(key, kv)
            self.stats["prefills"] += 1
        return kv

    @torch.no_grad()
    def _admit(self, requests: list[GenerationRequest]) -> None:
        parts, rows = [], []
        with self.lock:
            for request in requests:
                try:
                    kv = self._prefix_kv(request)
                except KeyError as err:  # the persona was deleted while the request waited
                    request.emit(Event("error", text=str(err).strip("'\""), status=404))
                    continue
                except Exception as err:
                    logger.exception("Prefix of a request failed.")
                    request.emit(Event("error", text=f"Could not build the prompt: {err}", status=500))
                    continue
                parts.append((kv, request.input_ids[request.prefix_length :]))
                rows.append(
                    _Row(
                        request,
                        TextTracker(self.tokenizer, request.sampling.stop),
                        make_generator(request.sampling.seed),
                        list(request.input_ids),
                    )
                )
            if not rows:
                return
            cache, mask, positions, logits = self._prefill(parts)
        self.stats["requests"] += len(rows)
        keep = [i for i, row in enumerate(rows) if not self._accept(row, logits[i])]
        if not keep:
            return
        kv, mask = select_rows(kv_from_cache(cache), mask, keep)
        rows, positions = [rows[i] for i in keep], positions[keep]
        if self._rows:
            kv, mask = concat_rows([(kv_from_cache(self._cache), self._mask), (kv, mask)])
            rows, positions = self._rows + rows, torch.cat([self._positions, positions])
        self._rows, self._cache, self._mask, self._positions = rows, to_cache(kv), mask, positions

    def _prefill(self, parts: list[tuple[KV, list[int]]]):
        """Rows laid out as [padding][cached prefix][padding][own ids]; one forward over the own ids."""
        lengths = [kv_length(kv) for kv, _ in parts]
        width = max(len(ids) for _, ids in parts)
        kv, prefix_mask = concat_rows(
            [(kv, torch.ones(1, n, dtype=torch.long, device=self._device)) for (kv, _), n in zip(parts, lengths)]
        )
        batch = len(parts)
        ids = torch.full((batch, width), self._pad, dtype=torch.long, device=self._device)  # (batch, width)
        own_mask = torch.zeros(batch, width, dtype=torch.long, device=self._device)
        positions = torch.zeros(batch, width, dtype=torch.long, device=self._device)
        for i, ((_, own), start) in enumerate(zip(parts, lengths)):
            span = slice(width - len(own), width)
            ids[i, span] = torch.tensor(own, device=self._device)
            own_mask[i, span] = 1
            positions[i, :] = start
            positions[i, span] = torch.arange(start, start + len(own), device=self._device)
        mask = torch.cat([prefix_mask, own_mask], dim=1)
        out = self.forward(ids, mask, positions, to_cache(kv))
        next_positions = torch.tensor([n + len(own) for n, (_, own) in zip(lengths, parts)], device=self._device)
        return self._out_cache(out), mask, next_positions, out.logits[:, -1]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache):
        """The base model on ``ids`` (batch, new) after ``cache``; logits of the last position only.

        ``mask`` (batch, cached + new) is 0 over padding; ``positions`` (batch, new) are the ids' positions.
        """
        kwargs = {self._cache_arg: cache}
        return self._base(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **kwargs
        )

    @staticmethod
    def _out_cache(out):
        cache = getattr(out, "cache", None)
        return cache if cache is not None else out.past_key_values

    @torch.no_grad()
    def _step(self) -> None:
        batch = len(self._rows)
        tokens = torch.tensor([[row.pending] for row in self._rows], device=self._device)  # (batch, 1)
        mask = torch.cat([self._mask, self._mask.new_ones(batch, 1)], dim=1)
        with self.lock:
            out = self.forward(tokens, mask, self._positions[:, None], self._cache)
        self._cache, self._mask, self._positions = self._out_cache(out), mask, self._positions + 1
        self.stats["steps"] += 1
        self.stats["row_steps"] += batch
        self.stats["max_rows"] = max(self.stats["max_rows"], batch)
        logits = out.logits[:, -1]
        keep = [i for i, row in enumerate(self._rows) if not self._accept(row, logits[i])]
        self._keep(keep)

    def _drop_cancelled(self) -> None:
        keep = [i for i, row in enumerate(self._rows) if not row.request.cancelled.is_set()]
        if len(keep) < len(self._rows):
            logger.info("Dropping %d cancelled requests from the batch.", len(self._rows) - len(keep))
            self._keep(keep)

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._reset()
            return
        kv, self._mask = select_rows(kv_from_cache(self._cache), self._mask, keep)
        self._cache, self._positions = to_cache(kv), self._positions[keep]
        self._rows = [self._rows[i] for i in keep]

    def _reset(self) -> None:
        self._rows, self._cache, self._mask, self._positions = [], None, None, None

    def _accept(self, row: _Row, logits: torch.Tensor) -> bool:
        """Pick the row's next token and tell its request; True when the row is finished."""
        params = row.request.sampling
        seen = torch.tensor(row.seen, device=logits.device) if params.repetition_penalty != 1.0 else None
        banned = self._banned if row.completion_tokens >= params.min_tokens else self._banned + sorted(self._eos)
        token = pick_token(logits, params, row.generator, seen, banned)
        row.completion_tokens += 1
        finish = None
        if token in self._eos:
            finish = "stop"
        else:
            row.tracker.add(token)
            row.seen.append(token)
            if row.tracker.stopped:
                finish = "stop"
            elif row.completion_tokens >= params.max_tokens:
                finish = "length"
        piece = row.tracker.take(final=finish is not None)
        if piece:
            row.request.emit(Event("delta", text=piece))
        if finish is None:
            row.pending = token
            return False
        usage = {
            "prompt_tokens": row.request.prompt_tokens,
            "completion_tokens": row.completion_tokens,
            "total_tokens": row.request.prompt_tokens + row.completion_tokens,
        }
        row.request.emit(Event("done", finish_reason=finish, usage=usage))
        return True
