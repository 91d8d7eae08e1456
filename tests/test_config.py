"""Settings: file, then environment, then flags; clear errors naming the key; secrets masked."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from comfyq import config
from comfyq.config import ConfigError, load_settings, masked

ROOT = Path(__file__).resolve().parents[1]


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(
        'api_port = 9000\nmax_queue_size = 5\ncomfyui_backends = ["http://a:1/", "http://b:2"]\n'
    )
    s = load_settings(
        config_path=str(f), env={"API_PORT": "9100"}, overrides={"max_queue_size": "7"}
    )
    assert (s.api_port, s.max_queue_size) == (9100, 7)
    assert s.backends == ["http://a:1", "http://b:2"]
    s = load_settings(config_path=str(f), env={"COMFYUI_BACKENDS": "http://x, http://y,"})
    assert s.backends == ["http://x", "http://y"]


def test_legacy_names_keep_their_meaning() -> None:
    env = {
        "COMFYUI_API_BASE": "http://gpu:8188",
        "PREPROCESS_WORKERS": "5",
        "GENERATION_WORKERS": "4",
        "S3_BUCKET_NAME": "b",
        "WEBHOOK_TIMEOUT": "12.5",
        "COMFYQ_JOB_TIMEOUT": "60",
    }
    s = load_settings(env=env, config_path=None)
    assert (s.backends, s.preprocess_workers, s.generation_workers) == (["http://gpu:8188"], 5, 4)
    assert (s.s3_bucket_name, s.webhook_timeout, s.job_timeout) == ("b", 12.5, 60.0)


def test_choices_accept_any_case() -> None:
    s = load_settings(env={"API_LOG_LEVEL": "WARNING", "COMFYQ_LOG_FORMAT": "Json"})
    assert (s.api_log_level, s.log_format) == ("warning", "json")


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"API_PORT": "eighty"}, "api_port"),
        ({"PREPROCESS_WORKERS": "0"}, "preprocess_workers"),
        ({"COMFYQ_SSE_COALESCE_MS": "-1"}, "sse_coalesce_ms"),
        ({"COMFYQ_SSE_COALESCE_MS": "5000"}, "sse_coalesce_ms"),
        ({"API_LOG_LEVEL": "loud"}, "api_log_level"),
        ({"COMFYQ_MAX_ATTEMPTS": "-1"}, "max_attempts"),
    ],
)
def test_bad_values_name_the_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_settings(env=env)


def test_unknown_file_key_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("api_prot = 1\n")
    with pytest.raises(ConfigError, match="api_prot"):
        load_settings(config_path=str(f), env={})


def test_secrets_masked() -> None:
    s = load_settings(
        env={"COMFYQ_API_KEYS": "k1,k2", "S3_SECRET_ACCESS_KEY": "shh", "WEBHOOK_SECRET": "w"}
    )
    m = masked(s)
    assert (
        m["api_keys"] == ["***", "***"]
        and m["s3_secret_access_key"] == "***"
        and m["webhook_secret"] == "***"
    )
    assert "shh" not in str(m)


def test_cli_stops_with_nonzero_exit_and_names_the_key(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("nonsense_key = 3\n")
    p = subprocess.run(
        [sys.executable, "-m", "comfyq", "--config", str(f), "config"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert p.returncode == 2 and "nonsense_key" in p.stderr
    p = subprocess.run(
        [sys.executable, "-m", "comfyq", "config"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={"PATH": "/usr/bin", "COMFYQ_API_KEYS": "topsecret"},
    )
    assert p.returncode == 0 and "topsecret" not in p.stdout and '"***"' in p.stdout


def test_every_setting_is_documented() -> None:
    readme = (ROOT / "README.md").read_text()
    for key, env, _default, desc in config.describe():
        assert desc, f"setting {key} has no description"
        assert re.search(rf"`{re.escape(env)}`", readme), f"{env} ({key}) is not in README.md"


def test_the_sse_coalescing_window_is_an_operator_setting(tmp_path: Path) -> None:
    from comfyq.api.context import API
    from comfyq.app import create_app
    from comfyq.services import Services

    for value, seconds in (("0", 0.0), ("250", 0.25), (None, 0.02)):
        env = {"COMFYQ_DATABASE": str(tmp_path / f"q{value}.db")}
        if value is not None:
            env["COMFYQ_SSE_COALESCE_MS"] = value
        app = create_app(Services(load_settings(env=env, config_path=None)))
        assert app[API].options.stream_coalesce == seconds
