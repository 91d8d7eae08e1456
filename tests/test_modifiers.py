"""Modifier registry, BaseModifier compatibility, admission checks and the shipped modifiers."""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path
from typing import Any

import pytest

from comfyq.errors import BadRequest, ModifierError
from modifiers import BaseModifier, MissingModification, ModifierRegistry
from modifiers.basemodifier import (
    DEFAULT_WORKFLOWS_DIR,
    TrackingDict,
    looks_like_url,
    replace_random_ints,
)

# Built-in ComfyUI nodes that need no model weights (see the recorded object_info).
MODEL_FREE_NODES = {
    "EmptyImage",
    "ImageInvert",
    "SaveImage",
    "PreviewImage",
    "LoadImage",
    "ImageScale",
    "ImageBlur",
}


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def assert_links_resolve(workflow: dict[str, Any]) -> None:
    """Every [node_id, index] link points at a node that exists."""
    for node_id, node in workflow.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                assert value[0] in workflow, f"{node_id}.{name} links to missing node {value[0]}"


@pytest.fixture(scope="module")
def registry() -> ModifierRegistry:
    return ModifierRegistry()


def test_builtin_modifiers_are_discovered(registry: ModifierRegistry) -> None:
    assert registry.names() == ["Image2Image", "ImageEffects", "Text2Image"]
    assert "BaseModifier" not in registry.names()


def test_unknown_modifier_lists_the_available_ones(registry: ModifierRegistry) -> None:
    with pytest.raises(BadRequest) as info:
        registry.get("Upscale4x")
    err = info.value
    assert "Image2Image, ImageEffects, Text2Image" in err.message
    assert err.fields and err.fields[0]["path"] == "$.input.modifier"
    assert err.http_status == 400
    with pytest.raises(BadRequest, match="did you mean Text2Image"):
        registry.get("text2image")
    # Names never reach an import statement: module-ish names are just unknown names.
    for hostile in ("os", "basemodifier", "../etc/passwd", "modifiers.text2image", ""):
        with pytest.raises(BadRequest):
            registry.get(hostile)


def test_user_folder_modifiers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "mods"
    write(
        folder,
        "sepia.json",
        '{"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8,'
        ' "batch_size": 1, "color": 0}}}',
    )
    write(
        folder,
        "sepia.py",
        """
        from modifiers.basemodifier import BaseModifier
        from modifiers.text2image import Text2Image  # imported, not defined here

        class Sepia(BaseModifier):
            WORKFLOW_JSON = "sepia.json"

            async def apply_modifications(self):
                self.workflow["1"]["inputs"]["width"] = await self.modify_workflow_value("size", 8)
                await super().apply_modifications()

        class _Helper(BaseModifier):
            pass
        """,
    )
    write(
        folder,
        "override.py",
        """
        from modifiers.basemodifier import BaseModifier

        class ImageEffects(BaseModifier):
            WORKFLOW_JSON = "sepia.json"
        """,
    )
    write(folder, "_ignored.py", "raise RuntimeError('never imported')\n")
    with caplog.at_level(logging.WARNING):
        reg = ModifierRegistry([folder])
    assert reg.names() == ["Image2Image", "ImageEffects", "Sepia", "Text2Image"]
    assert reg.get("ImageEffects").__module__.startswith("comfyq_user_modifiers_")
    assert reg.get("Text2Image").__module__ == "modifiers.text2image"
    assert "replaces" in caplog.text


async def test_user_modifier_runs_from_any_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "mods"
    write(folder, "sepia.json", '{"1": {"class_type": "EmptyImage", "inputs": {"width": 8}}}')
    write(
        folder,
        "sepia.py",
        """
        from modifiers.basemodifier import BaseModifier

        class Sepia(BaseModifier):
            WORKFLOW_JSON = "sepia.json"

            async def apply_modifications(self):
                self.workflow["1"]["inputs"]["width"] = await self.modify_workflow_value("size", 8)
                await super().apply_modifications()
        """,
    )
    monkeypatch.chdir(tmp_path / "..")
    reg = ModifierRegistry([folder])
    wf = await reg.create("Sepia", {"size": 32}).get_modified_workflow()
    assert wf["1"]["inputs"]["width"] == 32
    # Built-ins too: their JSON is found next to the package, not in the CWD.
    wf = await reg.create("ImageEffects", {}).get_modified_workflow()
    assert wf["1"]["class_type"] == "EmptyImage"


def test_user_folder_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ModifierError, match="does not exist"):
        ModifierRegistry([tmp_path / "missing"])
    write(tmp_path / "bad", "broken.py", "def oops(:\n")
    with pytest.raises(ModifierError, match=r"broken\.py failed to import: SyntaxError"):
        ModifierRegistry([tmp_path / "bad"])


async def test_seed_style_modifier_is_compatible(tmp_path: Path) -> None:
    # Written the way the original wrapper's README shows: mutable default, a path relative
    # to the project root ("workflows/..."), modify_workflow_value with defaults.
    root = tmp_path / "project"
    write(
        root / "workflows",
        "legacy.json",
        json.dumps(
            {
                "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 1}},
                "10": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
            }
        ),
    )
    write(
        root / "mymods",
        "legacy.py",
        """
        import random
        from modifiers.basemodifier import BaseModifier

        class Legacy(BaseModifier):
            WORKFLOW_JSON = "workflows/legacy.json"

            def __init__(self, modifications={}):
                super().__init__(modifications)

            async def apply_modifications(self):
                self.workflow["3"]["inputs"]["seed"] = await self.modify_workflow_value(
                    "seed", random.randint(0, 2**32))
                self.workflow["3"]["inputs"]["steps"] = await self.modify_workflow_value("steps")
                self.workflow["10"]["inputs"]["image"] = await self.modify_workflow_value(
                    "input_image", "")
                await super().apply_modifications()
        """,
    )
    reg = ModifierRegistry([root / "mymods"])
    wf = await reg.create("Legacy", {"steps": 7, "seed": "__RANDOM_INT__"}).get_modified_workflow()
    assert wf["3"]["inputs"]["steps"] == 7
    assert isinstance(wf["3"]["inputs"]["seed"], int)
    assert 0 <= wf["3"]["inputs"]["seed"] <= 2**32 - 1
    # A missing key with no default raises IndexError, as the original's did.
    with pytest.raises(IndexError):
        await reg.create("Legacy", {}).get_modified_workflow()
    with pytest.raises(BadRequest, match="'steps' is required") as info:
        await reg.check("Legacy", {})
    assert info.value.fields == [
        {"path": "$.input.modifications.steps", "message": "modification 'steps' is required"}
    ]
    with pytest.raises(BadRequest, match="unknown modification for Legacy: colour"):
        await reg.check("Legacy", {"steps": 1, "colour": "red"})
    await reg.check("Legacy", {"steps": 1, "seed": 5, "input_image": "https://x.test/a.png"})


async def test_check_reports_unknown_keys_by_name(registry: ModifierRegistry) -> None:
    await registry.check("Text2Image", {"prompt": "a cat", "steps": 20, "cfg_scale": 7})
    with pytest.raises(BadRequest) as info:
        await registry.check("Text2Image", {"prompt": "a cat", "stesp": 20, "sampler": "x"})
    err = info.value
    assert "stesp, sampler" in err.message
    assert [f["path"] for f in err.fields or []] == [
        "$.input.modifications.stesp",
        "$.input.modifications.sampler",
    ]
    assert "steps" in err.details["accepted"]
    with pytest.raises(BadRequest) as info:
        await registry.check("Text2Image", {"odd key": 1})
    assert (info.value.fields or [])[0]["path"] == "$.input.modifications['odd key']"
    with pytest.raises(BadRequest, match="must be an object"):
        await registry.check("Text2Image", ["prompt"])  # type: ignore[arg-type]
    with pytest.raises(BadRequest, match="unknown modifier"):
        await registry.check("Nope", {})


@pytest.mark.parametrize(
    ("name", "mods", "path"),
    [
        ("Text2Image", {"steps": "many"}, "steps"),
        ("Text2Image", {"steps": 0}, "steps"),
        ("Text2Image", {"width": 8}, "width"),
        ("Text2Image", {"denoise": 2}, "denoise"),
        ("Text2Image", {"prompt": 5}, "prompt"),
        ("Text2Image", {"filename_prefix": "../escape"}, "filename_prefix"),
        ("Text2Image", {"filename_prefix": "/abs"}, "filename_prefix"),
        ("Image2Image", {}, "input_image"),
        ("ImageEffects", {"color": "#zzzzzz"}, "color"),
        ("ImageEffects", {"blur_radius": 40}, "blur_radius"),
        ("ImageEffects", {"invert": "maybe"}, "invert"),
        ("ImageEffects", {"upscale_method": "magic"}, "upscale_method"),
        ("ImageEffects", {"width": 0}, "width"),
    ],
)
async def test_check_rejects_bad_values(
    registry: ModifierRegistry, name: str, mods: dict[str, Any], path: str
) -> None:
    with pytest.raises(BadRequest) as info:
        await registry.check(name, mods)
    assert (info.value.fields or [])[0]["path"] == f"$.input.modifications.{path}"


async def test_check_turns_modifier_crashes_into_bad_request(tmp_path: Path) -> None:
    write(
        tmp_path,
        "crashy.py",
        """
        from modifiers.basemodifier import BaseModifier

        class Crashy(BaseModifier):
            async def load_workflow(self, workflow=None):
                self.workflow = {}
                self._loaded = True

            async def apply_modifications(self):
                1 / int(self.modifications.get("divisor", 0))
        """,
    )
    reg = ModifierRegistry([tmp_path])
    with pytest.raises(BadRequest, match="Crashy rejected the modifications: ZeroDivisionError"):
        await reg.check("Crashy", {})
    await reg.check("Crashy", {"divisor": 2})


async def test_declared_accepts_list_is_used(tmp_path: Path) -> None:
    write(
        tmp_path,
        "declared.py",
        """
        from modifiers.basemodifier import BaseModifier

        class Declared(BaseModifier):
            ACCEPTS = ("a", "b")

            async def load_workflow(self, workflow=None):
                self.workflow = {}
                self._loaded = True

            async def apply_modifications(self):
                pass  # reads nothing: the declaration alone decides
        """,
    )
    reg = ModifierRegistry([tmp_path])
    await reg.check("Declared", {"a": 1, "b": 2})
    with pytest.raises(BadRequest, match="unknown modification for Declared: c"):
        await reg.check("Declared", {"a": 1, "c": 3})


async def test_text2image_fills_the_seed_node_layout(registry: ModifierRegistry) -> None:
    mods = {
        "prompt": "a lighthouse",
        "negative_prompt": "fog",
        "steps": "30",
        "seed": 1234,
        "cfg_scale": 6.5,
        "width": 640,
        "height": 384,
        "sampler_name": "dpmpp_2m",
        "ckpt_name": "other.safetensors",
    }
    await registry.check("Text2Image", mods)
    wf = await registry.create("Text2Image", mods).get_modified_workflow()
    ks = wf["3"]["inputs"]
    assert (ks["seed"], ks["steps"], ks["cfg"], ks["sampler_name"]) == (1234, 30, 6.5, "dpmpp_2m")
    assert wf["4"]["inputs"]["ckpt_name"] == "other.safetensors"
    assert (wf["5"]["inputs"]["width"], wf["5"]["inputs"]["height"]) == (640, 384)
    assert wf["6"]["inputs"]["text"] == "a lighthouse" and wf["7"]["inputs"]["text"] == "fog"
    assert wf["9"]["class_type"] == "SaveImage"
    assert_links_resolve(wf)
    # Defaults: a fresh random seed per job, 512x512, euler.
    a = await registry.create("Text2Image", {}).get_modified_workflow()
    assert a["5"]["inputs"]["width"] == 512 and a["3"]["inputs"]["sampler_name"] == "euler"
    assert 0 <= a["3"]["inputs"]["seed"] <= 2**32 - 1


async def test_image2image_sets_input_image_and_checkpoint(registry: ModifierRegistry) -> None:
    mods = {"input_image": "https://img.test/in.png", "prompt": "oil", "denoise": 0.5}
    await registry.check("Image2Image", mods)
    wf = await registry.create("Image2Image", mods).get_modified_workflow()
    # Without a downloader bound, URLs are left for the framework to replace.
    assert wf["10"]["class_type"] == "LoadImage"
    assert wf["10"]["inputs"]["image"] == "https://img.test/in.png"
    assert wf["14"]["class_type"] == "CheckpointLoaderSimple"
    assert wf["3"]["inputs"]["denoise"] == 0.5
    assert wf["12"]["inputs"]["pixels"] == ["10", 0]
    assert_links_resolve(wf)


@pytest.mark.parametrize(
    ("mods", "classes", "saved_from"),
    [
        ({}, {"EmptyImage", "ImageInvert", "SaveImage"}, "2"),
        ({"invert": False}, {"EmptyImage", "SaveImage"}, "1"),
        (
            {"blur_radius": 3, "sigma": 2},
            {"EmptyImage", "ImageInvert", "ImageBlur", "SaveImage"},
            "3",
        ),
        ({"input_image": "in.png"}, {"LoadImage", "ImageInvert", "SaveImage"}, "2"),
        (
            {"input_image": "https://x.test/a.png", "width": 64, "invert": "false"},
            {"LoadImage", "ImageScale", "SaveImage"},
            "11",
        ),
    ],
)
async def test_image_effects_graph_variants(
    registry: ModifierRegistry, mods: dict[str, Any], classes: set[str], saved_from: str
) -> None:
    await registry.check("ImageEffects", mods)
    wf = await registry.create("ImageEffects", mods).get_modified_workflow()
    assert {n["class_type"] for n in wf.values()} == classes
    assert classes <= MODEL_FREE_NODES
    assert wf["9"]["inputs"]["images"] == [saved_from, 0]
    assert_links_resolve(wf)


async def test_image_effects_values(registry: ModifierRegistry) -> None:
    wf = await registry.create(
        "ImageEffects", {"width": 96, "height": 48, "color": "#ff8000", "batch_size": 2}
    ).get_modified_workflow()
    assert wf["1"]["inputs"] == {"width": 96, "height": 48, "batch_size": 2, "color": 0xFF8000}
    wf = await registry.create(
        "ImageEffects", {"input_image": "a.png", "height": 64}
    ).get_modified_workflow()
    assert wf["11"]["inputs"]["width"] == 0  # keep the aspect ratio
    assert wf["11"]["inputs"]["height"] == 64


def test_shipped_workflow_files_are_api_format() -> None:
    files = sorted(DEFAULT_WORKFLOWS_DIR.glob("*.json"))
    assert {f.name for f in files} >= {"text2image.json", "image2image.json", "image_effects.json"}
    for f in files:
        wf = json.loads(f.read_text())
        for node in wf.values():
            assert isinstance(node["class_type"], str) and isinstance(node["inputs"], dict)
        assert_links_resolve(wf)
    effects = json.loads((DEFAULT_WORKFLOWS_DIR / "image_effects.json").read_text())
    assert {n["class_type"] for n in effects.values()} <= MODEL_FREE_NODES


async def test_base_modifier_raw_workflow_and_random_ints() -> None:
    wf = {
        "1": {"class_type": "EmptyImage", "inputs": {"color": "__RANDOM_INT__"}},
        "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x___RANDOM_INT___y"}},
        "3": {"class_type": "X", "inputs": {"list": ["__RANDOM_INT__", "__RANDOM_INT__", 5]}},
    }
    m = BaseModifier()
    await m.load_workflow(wf)
    out = await m.get_modified_workflow()
    assert isinstance(out["1"]["inputs"]["color"], int)
    prefix = out["2"]["inputs"]["filename_prefix"]
    assert prefix.startswith("x_") and prefix.endswith("_y") and prefix[2:-2].isdigit()
    a, b, c = out["3"]["inputs"]["list"]
    assert isinstance(a, int) and isinstance(b, int) and c == 5
    assert a != b  # each occurrence gets its own value (1 in 2**32 to collide)


def test_replace_random_ints_range_and_placeholder() -> None:
    wf: dict[str, Any] = {"a": ["__RANDOM_INT__"] * 200, "b": "seed-@@"}
    replace_random_ints(wf, lo=3, hi=5)
    assert set(wf["a"]) <= {3, 4, 5}
    replace_random_ints(wf, lo=1, hi=1, placeholder="@@")
    assert wf["b"] == "seed-1"


def test_looks_like_url() -> None:
    assert looks_like_url("https://a.test/x.png")
    assert looks_like_url("HTTP://a.test/x.png")
    assert not looks_like_url("a cat, see https://a.test")
    assert not looks_like_url("https://a.test/x y.png")
    assert not looks_like_url("ftp://a.test/x.png")
    assert not looks_like_url(5)


def test_tracking_dict_records_reads() -> None:
    d = TrackingDict({"a": 1, "b": 2, "c": 3})
    _ = d["a"], d.get("b"), "zz" in d
    assert d.accessed == {"a", "b", "zz"}
    list(d.items())
    assert d.accessed >= {"a", "b", "c"}


async def test_missing_modification_is_index_error() -> None:
    m = BaseModifier({"x": 1})
    assert await m.modify_workflow_value("x") == 1
    assert await m.modify_workflow_value("y", 0) == 0
    with pytest.raises(MissingModification) as info:
        await m.modify_workflow_value("y")
    assert isinstance(info.value, IndexError) and info.value.key == "y"
