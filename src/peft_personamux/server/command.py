"""``personamux serve``: the arguments, building the app from a loaded codebook, and running it with uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass, field

from ..codebook_loading import CodebookInfo, load_codebook_model, read_codebook_info, resolve_codebook_dir

logger = logging.getLogger(__name__)


@dataclass
class ServeArguments:
    codebook: str | None = field(default=None, metadata={"help": "Codebook folder. Default: the shipped one."})
    persona_dir: str | None = field(
        default="personamux_personas",
        metadata={"help": "Folder whose personas/ receives uploads (POST /v1/personas); '' disables uploads."},
    )
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (loopback by default)."})
    port: int = field(default=8000, metadata={"help": "Port to listen on."})
    max_batch: int = field(default=8, metadata={"help": "Rows decoded together; more requests wait in the queue."})
    batch_window_ms: float = field(
        default=10.0, metadata={"help": "When idle, wait this long after a request for others to batch with it."}
    )
    max_queue: int = field(default=64, metadata={"help": "Waiting requests; over it the server answers 429."})
    prefix_cache_size: int = field(
        default=64,
        metadata={"help": "Persona prefixes whose key/value cache is kept (LRU; SmolLM2: about 3 MB each; 0: off)."},
    )
    max_tokens: int = field(default=256, metadata={"help": "Answer length when a request sets no max_tokens."})
    max_context: int | None = field(
        default=None, metadata={"help": "Prompt + answer positions allowed. Default: the model's maximum."}
    )
    base_name: str | None = field(
        default=None, metadata={"help": "Model id of the base model (no persona). Default: from the adapter config."}
    )


def build_app(model, tokenizer, info: CodebookInfo, args: ServeArguments):
    """The FastAPI app serving ``model`` (a Persona-Mux ``PeftModel`` with its personas registered)."""
    from .app import ServerSettings, create_app
    from .engine import BatchEngine
    from .personas import PersonaStore

    engine = BatchEngine(
        model, tokenizer, args.max_batch, args.batch_window_ms, args.max_queue, args.prefix_cache_size
    )
    store = PersonaStore(model, engine, info, args.persona_dir or None)
    config = model.adapter_config()
    named = config.base_model_name_or_path or getattr(model.get_base_model().config, "name_or_path", None)
    base_name = args.base_name or os.path.basename(str(named or "base").rstrip("/"))
    limit = getattr(model.get_base_model().config, "max_position_embeddings", None) or 2048
    settings = ServerSettings(base_name, min(args.max_context or limit, limit), args.max_tokens)
    return create_app(engine, store, settings)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(model_args, args: ServeArguments) -> int:
    """Serve the codebook's personas with an OpenAI-compatible API (chat completions, batched personas)."""
    try:
        import uvicorn
    except ImportError:
        raise SystemExit("`personamux serve` needs the serve extra: pip install 'peft-personamux[serve]'.") from None
    try:
        codebook = resolve_codebook_dir(args.codebook)
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None
    model, tokenizer = load_codebook_model(codebook, model_args.model_name_or_path, model_args.dtype)
    app = build_app(model, tokenizer, read_codebook_info(codebook), args)
    if not _is_loopback(args.host):
        logger.warning("Listening on %s: the API has no authentication; anyone who reaches it can use it.", args.host)
    print(f"Serving {len(model.personas)} personas of {codebook} on http://{args.host}:{args.port}/v1")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
