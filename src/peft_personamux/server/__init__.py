"""``personamux serve``: an OpenAI-compatible server that batches requests for different personas.

Needs the ``serve`` extra (FastAPI, uvicorn). See docs/serving.md.
"""

from .command import ServeArguments, build_app, serve

__all__ = ["ServeArguments", "build_app", "serve"]
