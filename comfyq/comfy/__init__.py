"""ComfyUI side of comfyq: client, protocol types and the simulator."""
