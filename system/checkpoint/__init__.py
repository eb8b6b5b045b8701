"""Saving and loading model state (consolidated safetensors with global expert indices)."""

from system.checkpoint.model_io import full_state_dict, load_model, read_config, save_model

__all__ = ["full_state_dict", "load_model", "read_config", "save_model"]
