"""The HTTP server: an OpenAI-compatible API over one engine thread.

``async_engine`` owns the thread that drives the LLMEngine; ``app`` builds the FastAPI routes;
``protocol`` is the wire format, ``errors`` its error bodies, ``metrics`` the Prometheus view;
``runner`` serves the app with uvicorn and drains on SIGINT / SIGTERM. Run it with ``specserve serve``.
Online distillation's server side: ``draft_watcher`` hot-swaps the drafts a trainer publishes (with
rollback), ``trainer_process`` keeps that trainer running beside the server; ``traffic_log`` feeds it.
"""

from specserve.server.app import build_app
from specserve.server.async_engine import AsyncEngine
from specserve.server.runner import run_server

__all__ = ["AsyncEngine", "build_app", "run_server"]
