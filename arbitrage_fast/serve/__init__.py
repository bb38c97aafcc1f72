"""OpenAI-compatible HTTP serving of the engine (needs the `serve` extra: FastAPI and uvicorn)."""
from .app import create_app
from .process import run_server

__all__ = ["create_app", "run_server"]
