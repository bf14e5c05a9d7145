"""The stack's environment defaults (storage/environment.py) reach the libraries they are for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prefect_setting(name: str, env: dict[str, str]) -> str:
    code = f"import flows, prefect.settings as s; print(getattr(s, {name!r}).value())"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def test_prefects_temporary_server_gets_two_minutes_to_start_unless_the_user_says_otherwise():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_SERVER_EPHEMERAL")}
    name = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
    assert prefect_setting(name, env) == "120"
    assert prefect_setting(name, {**env, name: "45"}) == "45"
