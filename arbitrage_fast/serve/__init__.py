"""OpenAI-compatible HTTP serving of the engine (needs the `serve` extra: FastAPI and uvicorn)."""
from .app import create_app

__all__ = ["create_app"]
