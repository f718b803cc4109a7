"""``megacontext serve``: an OpenAI-compatible HTTP server whose conversations keep
their memory on disk.

- :mod:`.protocol`: the wire format (requests, errors, chunks); pydantic only.
- :mod:`.chat`: which messages of a request are new, and the text that carries them.
- :mod:`.engine`: conversations, the scheduler thread (one batched forward per
  decode step) and the persister; no web framework.
- :mod:`.app`: the FastAPI app (needs the ``serve`` extra: fastapi, uvicorn).

See ``docs/serve.md``.
"""

from __future__ import annotations

from .engine import Engine, ServeLimits, TurnRequest

__all__ = ["Engine", "ServeLimits", "TurnRequest", "create_app", "run"]


def create_app(engine: Engine, model_id: str | None = None):
    """The FastAPI app over ``engine`` (see :func:`megacontext.serve.app.create_app`)."""
    from .app import create_app as _create

    return _create(engine, model_id)


def run(engine: Engine, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    """Serve ``engine`` with uvicorn until interrupted (then the engine is closed)."""
    import logging

    import uvicorn

    logger = logging.getLogger("megacontext.serve")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(log_level.upper())
    uvicorn.run(create_app(engine), host=host, port=port, log_level=log_level)
