"""The ComfyUI simulator: a real HTTP/websocket server speaking the recorded protocol; imports
nothing of comfyq's."""

from comfyq.sim.server import Simulator, main

__all__ = ["Simulator", "main"]
