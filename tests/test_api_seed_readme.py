"""The original wrapper's README examples (requests + sseclient) run unchanged against comfyq.

The Python blocks are taken from ../shared/spec/seed-wrapper-README.md when it is there (and must
then equal the copies below). Only two things are substituted: the server address, and the
README's placeholder modifier ("YourModifier", {"param": "value"}) by a modifier that exists.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

from support.servers import ThreadServer

SEED_README = Path(__file__).resolve().parents[2] / "shared" / "spec" / "seed-wrapper-README.md"

SYNC_EXAMPLE = """import requests

payload = {
    "input": {
        "modifier": "YourModifier",
        "modifications": {"param": "value"}
    }
}

response = requests.post(
    "http://localhost:8000/generate/sync?timeout=300",
    json=payload
)
result = response.json()
print(f"Status: {result['status']}")
"""

STREAM_EXAMPLE = """import requests
import json
import sseclient

response = requests.post(
    "http://localhost:8000/generate/stream", 
    json=payload,
    stream=True
)

client = sseclient.SSEClient(response)
for event in client.events():
    if event.data:
        data = json.loads(event.data)
        if data.get("status") == "final_result":
            print("Generation complete!")
            break
        else:
            pos = data.get("queue_position", {})
            if pos.get("position"):
                print(f"Position {pos['position']} of {pos['queue_size']} in {pos['current_queue']}")
"""  # noqa: E501 - the seed README's code, verbatim (a test checks the two are equal)

PLACEHOLDER = '"modifier": "YourModifier",\n        "modifications": {"param": "value"}'
REAL = (
    '"modifier": "ImageEffects",\n'
    '        "modifications": {"width": 32, "height": 32, "blur_radius": 1}'
)


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, re.DOTALL)


def test_embedded_examples_are_the_readme_s() -> None:
    if not SEED_README.exists():
        return  # the copies above are what we run
    blocks = python_blocks(SEED_README.read_text())
    assert SYNC_EXAMPLE in blocks and STREAM_EXAMPLE in blocks


def run(code: str, url: str, namespace: dict[str, object]) -> str:
    code = code.replace("http://localhost:8000", url).replace(PLACEHOLDER, REAL)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "seed-README", "exec"), namespace)  # noqa: S102 - the README's own code
    return out.getvalue()


def test_seed_readme_examples_run_as_written(thread_server: ThreadServer) -> None:
    assert PLACEHOLDER in SYNC_EXAMPLE
    namespace: dict[str, object] = {}
    printed = run(SYNC_EXAMPLE, thread_server.url, namespace)
    assert printed == "Status: completed\n"
    # A slow job ahead keeps the streamed job waiting, so positions get printed too.
    thread_server.sim.node_durations = {"ImageBlur": 0.6}
    import requests

    ahead: dict[str, Any] = {
        "input": {
            "modifier": "ImageEffects",
            "modifications": {"width": 16, "height": 16, "blur_radius": 2},
        }
    }
    assert requests.post(thread_server.url + "/generate", json=ahead, timeout=10).status_code == 202
    printed = run(STREAM_EXAMPLE, thread_server.url, namespace)
    lines = printed.splitlines()
    assert lines[-1] == "Generation complete!"
    assert any(
        re.fullmatch(r"Position \d+ of \d+ in (preprocessing|generation|postprocessing)", ln)
        for ln in lines
    )
