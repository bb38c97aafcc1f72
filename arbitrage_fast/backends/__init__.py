"""Remote backends: the step-level policies driving OpenAI-compatible vLLM/SGLang servers."""
from .openai_client import CompletionsClient, RemoteBackendError, RemoteModel
from .remote import RemoteEngine

__all__ = ["CompletionsClient", "RemoteBackendError", "RemoteEngine", "RemoteModel"]
