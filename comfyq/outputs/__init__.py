"""Outputs: collecting ComfyUI's files into comfyq's own folder, S3, base64."""
