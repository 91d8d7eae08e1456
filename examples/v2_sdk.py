"""Run a workflow through the official Comfy API v2 SDK (pip install comfy-sdk).

    make simulate                                            # comfyq + a simulated ComfyUI
    COMFY_BASE_URL=http://127.0.0.1:8000 python examples/v2_sdk.py

The same file runs unchanged against the official comfy-api-proxy (COMFY_BASE_URL=its address)
or any other Comfy API v2 server: nothing in it is specific to comfyq. It uploads an image (once:
the SDK hashes it and the server deduplicates), sets it as LoadImage's input, follows the job's
live events, then downloads the inverted image next to this script.
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile
import zlib
from pathlib import Path

from comfy_sdk import Comfy, OutputReady, Progress, StatusChange


def tiny_png(rgb: tuple[int, int, int], size: int = 32) -> bytes:
    """A solid-colour PNG, written by hand so the example needs nothing but the SDK."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + bytes(rgb) * size
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(row * size))
        + chunk(b"IEND", b"")
    )


WORKFLOW = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "v2_sdk"}},
}


def main() -> int:
    if not os.environ.get("COMFY_BASE_URL"):
        print("set COMFY_BASE_URL, e.g. COMFY_BASE_URL=http://127.0.0.1:8000", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        photo = Path(tmp) / "example.png"
        photo.write_bytes(tiny_png((250, 180, 20)))
        with Comfy() as client:
            wf = client.workflows.from_json(WORKFLOW)
            wf.set_input("1", "image", client.assets.from_file(photo))
            job = client.submit(wf)
            print(f"job {job.id}: {job.status}")
            for ev in job.events():
                if isinstance(ev, StatusChange):
                    print(f"  status {ev.status}")
                elif isinstance(ev, Progress):
                    print(f"  progress {ev.value:.0%} {ev.message or ''}".rstrip())
                elif isinstance(ev, OutputReady):
                    print(f"  output {ev.output.name}")
            job.refresh()  # the job itself is the truth; events are a convenience
            if job.status != "succeeded":
                print(f"job ended {job.status}: {job.error}", file=sys.stderr)
                return 1
            out = job.get_outputs("3")[0]
            dest = Path.cwd() / out.name
            out.to_file(dest)
            print(f"saved {dest} ({out.size_bytes} bytes, {out.content_type})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
