"""Native Llama-family decoder over the paged KV arena, and its checkpoint loader."""
from .architecture import DecoderSpec, UnsupportedArchitectureError
from .loader import CheckpointError, LoadedModel, load_model

__all__ = ["DecoderSpec", "UnsupportedArchitectureError", "CheckpointError", "LoadedModel", "load_model"]
