"""comfyq: a durable API server in front of ComfyUI."""

__version__ = "0.1.0"
