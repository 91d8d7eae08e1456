"""ComfyUI client side: the HTTP/websocket client, its protocol types, backends and file
transfer."""
