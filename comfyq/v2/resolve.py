"""``core/ASSET`` references in a v2 job's workflow, resolved by the preprocess stage.

Each reference becomes the name of an input file; the file itself is listed among the job's
prepared inputs, so the generate stage uploads it to whichever backend runs the job (on any
instance that shares the store), like every other comfyq input. The name is made from the blob's
hash and a harmless extension: the client's file name is never used as a path.
"""

from __future__ import annotations

import copy
import mimetypes
import re
from pathlib import Path
from typing import Any

from comfyq.errors import InputError
from comfyq.inputs.prepare import PreparedInput
from comfyq.store.assets import AssetRecord, AssetStore
from comfyq.v2.submit import asset_refs

_EXT = re.compile(r"^\.[A-Za-z0-9]{1,10}$")


def input_name(rec: AssetRecord) -> str:
    """The file name a v2 asset gets in ComfyUI's input folder."""
    digest = (rec.hash or "").split(":", 1)[-1][:24] or rec.id.replace("-", "")
    ext = Path(rec.file_path or "").suffix
    if not _EXT.fullmatch(ext):
        ext = mimetypes.guess_extension(rec.content_type or "") or ".bin"
    return f"v2_{digest}{ext.lower()}"


class AssetResolver:
    """Replaces ``core/ASSET`` objects with input file names, and lists the files to upload."""

    def __init__(self, store: Any) -> None:
        self.store = store  # comfyq.store.JobStore
        self.assets: AssetStore = store.assets()

    async def resolve(
        self, job_input: dict[str, Any]
    ) -> tuple[dict[str, Any], list[PreparedInput]]:
        """A copy of ``job_input`` whose workflow names files, and those files."""
        refs = list(asset_refs(job_input.get("workflow_json")))
        if not refs:
            return job_input, []
        resolved = dict(job_input)
        workflow = resolved["workflow_json"] = copy.deepcopy(job_input["workflow_json"])
        ids = [str((r.get("info") or {}).get("id")) for _, r in refs]
        found = await self.assets.assets(ids)
        files: dict[str, PreparedInput] = {}
        for node_id, node in workflow.items():
            inputs = node.get("inputs") if isinstance(node, dict) else None
            if not isinstance(inputs, dict):
                continue
            for key, value in list(inputs.items()):
                if not (isinstance(value, dict) and value.get("__type") == "core/ASSET"):
                    continue
                asset_id = str((value.get("info") or {}).get("id"))
                rec = found.get(asset_id)
                if rec is None or rec.path is None:
                    raise InputError(
                        f"asset {asset_id} (node {node_id}, input {key}) no longer exists",
                        node_id=str(node_id),
                    )
                name = input_name(rec)
                inputs[key] = name
                files[name] = PreparedInput(
                    name=name,
                    path=Path(rec.path),
                    mime=rec.content_type,
                    sha256=(rec.hash or "").split(":", 1)[-1],  # the blob's blake3: its identity
                    size=rec.size_bytes,
                )
        if any(True for _ in asset_refs(workflow)):
            raise InputError(
                "core/ASSET references are only resolved where a node input takes them"
            )
        return resolved, list(files.values())
