"""Where the API may listen without a token, seen from the command line and the real server:
`exfilwatch serve` refuses a non-loopback address with no write token before it binds anything
or starts anything, warns about what stays open otherwise, and the running server answers an
unauthenticated upload at once, without waiting for its body. Nothing here listens beyond
127.0.0.1: a process that would is stopped by a guard before its first bind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from detector import serve
from detector.errors import ConfigError
from tests.conftest import ROOT
from tests.service_support import models_copy, settings_for

BIND_GUARD_EXIT = 97
# Loaded by every Python process started with this directory first on PYTHONPATH: any bind
# of a socket ends the process with BIND_GUARD_EXIT, naming the address it wanted.
_SITECUSTOMIZE = f"""
import os, socket, sys

def _no_bind(self, address, *args):
    sys.stderr.write(f"bind attempted: {{address!r}}\\n")
    sys.stderr.flush()
    os._exit({BIND_GUARD_EXIT})

socket.socket.bind = _no_bind
"""


@pytest.fixture
def no_bind(tmp_path: Path) -> dict[str, str]:
    """An environment in which a process that tries to bind a socket dies instead."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(guard), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "COLUMNS": "200", "NO_COLOR": "1"}
    for key in [k for k in env if k.startswith("EXFILWATCH_")]:
        del env[key]
    return env


def _serve(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("exfilwatch")
    assert exe is not None, "the exfilwatch console script is not installed (pip install -e .)"
    return subprocess.run(
        [exe, "serve", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
        check=False,
    )


def test_the_bind_guard_works(tmp_path: Path, no_bind: dict[str, str]) -> None:
    """The refusal tests below rest on this: a process under the guard cannot bind."""
    run = subprocess.run(
        [sys.executable, "-c", "import socket; socket.socket().bind(('127.0.0.1', 0))"],
        capture_output=True,
        text=True,
        env=no_bind,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert run.returncode == BIND_GUARD_EXIT and "bind attempted" in run.stderr


def _config(tmp_path: Path, api: str) -> Path:
    models = models_copy(tmp_path)
    cfg = tmp_path / "exfilwatch.toml"
    cfg.write_text(
        f'state_dir = "{tmp_path / "var"}"\nmodels_dir = "{models}"\n\n[api]\n{api}\n'
        f'\n[[sources]]\nname = "spool"\nkind = "directory"\npath = "{tmp_path / "spool"}"\n'
    )
    return cfg


@pytest.mark.parametrize(
    ("api", "env", "message"),
    [
        (
            'host = "0.0.0.0"\nport = 8080',
            {},
            "error: refusing to listen on 0.0.0.0 with no api.token or api.token_file",
        ),
        (
            'host = "127.0.0.1"',
            {"EXFILWATCH_API__HOST": "::"},
            "error: refusing to listen on :: with no api.token or api.token_file",
        ),
        (
            'host = "192.0.2.10"',
            {},
            "error: refusing to listen on 192.0.2.10 with no api.token or api.token_file",
        ),
        (
            'host = "0.0.0.0"',
            {"EXFILWATCH_API__TOKEN": " "},
            "error: api.token is empty: give the token a value, or unset it",
        ),
    ],
    ids=["config-wildcard", "env-ipv6-wildcard", "interface-address", "empty-token"],
)
def test_serve_refuses_a_non_loopback_address_without_a_token(
    tmp_path: Path, no_bind: dict[str, str], api: str, env: dict[str, str], message: str
) -> None:
    cfg = _config(tmp_path, api)
    run = _serve(["--config", str(cfg)], {**no_bind, **env}, tmp_path)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [message]  # one line, no traceback, no bind
    assert not (tmp_path / "var").exists() and not (tmp_path / "spool").exists()  # nothing started


def test_the_image_config_does_not_start_without_a_token(
    tmp_path: Path, no_bind: dict[str, str]
) -> None:
    """The container's own config, paths pointed here, refuses to serve with no token given."""
    env = {
        **no_bind,
        "EXFILWATCH_STATE_DIR": str(tmp_path / "var"),
        "EXFILWATCH_MODELS_DIR": str(models_copy(tmp_path)),
    }
    run = _serve(["--config", str(ROOT / "deploy" / "exfilwatch.toml")], env, tmp_path)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        "error: refusing to listen on 0.0.0.0 with no api.token or api.token_file"
    ]


def test_run_refuses_before_it_makes_a_socket_or_a_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[str] = []

    def forbidden(what: str) -> Any:
        def make(*_args: Any, **_kwargs: Any) -> Any:
            made.append(what)
            raise AssertionError(f"{what} made before the refusal")

        return make

    monkeypatch.setattr(serve.socket, "socket", forbidden("socket"))
    monkeypatch.setattr(serve, "Service", forbidden("service"))
    settings = settings_for(tmp_path, tmp_path / "models", api={"host": "0.0.0.0"})
    with pytest.raises(ConfigError, match=r"refusing to listen on 0\.0\.0\.0"):
        serve.run(settings)
    assert made == []


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.10.0.3", True),
        ("::1", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.1.2.3", False),
        ("192.0.2.10", False),
        ("exfilwatch.example.internal", False),
        ("::ffff:10.0.0.1", False),
    ],
)
def test_only_loopback_addresses_count_as_loopback(host: str, loopback: bool) -> None:
    assert serve.is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("api", "warnings"),
    [
        ({}, ["api_writes_open"]),
        ({"token": "t0k"}, []),
        ({"host": "0.0.0.0", "token": "t0k"}, ["api_reads_open"]),
        ({"host": "0.0.0.0", "token": "t0k", "read_token": "r34d"}, []),
    ],
)
def test_what_stays_open_is_logged_as_a_warning(
    tmp_path: Path, api: dict[str, str], warnings: list[str]
) -> None:
    settings = settings_for(tmp_path, tmp_path / "models", api=api)
    with capture_logs() as logs:
        serve.check_exposure(settings)
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == warnings


# --- the real server --------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[int]:
    """`exfilwatch serve` on 127.0.0.1 with a write token, on a free port; yields the port."""
    cfg = _config(
        tmp_path, 'host = "127.0.0.1"\nport = 0\ntoken = "s3cret"\nmax_verdict_body_bytes = 4096'
    )
    exe = shutil.which("exfilwatch")
    assert exe is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXFILWATCH_")}
    proc = subprocess.Popen(
        [exe, "serve", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    lines: list[str] = []
    listening: list[int] = []
    up = threading.Event()

    def read() -> None:  # drains the log for as long as the process runs
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace")
            lines.append(line)
            if '"api_listening"' in line:
                listening.append(int(json.loads(line)["port"]))
                up.set()
        up.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert up.wait(120) and listening, "".join(lines[-20:])
        yield listening[0]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, "".join(lines[-20:])
        reader.join(10)


def _exchange(port: int, head: str) -> tuple[int, dict[str, str], bytes]:
    """Send request headers only (no body bytes at all) and read the answer to the end of
    the connection. A server that waited for the announced body would never answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        conn.sendall(head.replace("\n", "\r\n").encode() + b"\r\n")
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    top, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = top.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, body


def test_the_server_answers_an_unauthenticated_upload_without_reading_it(server: int) -> None:
    status, headers, body = _exchange(
        server,
        (
            "POST /v1/model/promote HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n"
            "Content-Length: 300000000\n"
        ),
    )
    assert status == 401 and headers["connection"] == "close"
    assert b"write token" in body
    # with the token, a body declared past the route's limit is refused the same way
    status, headers, body = _exchange(
        server,
        (
            "POST /v1/incidents/inc_x/ack HTTP/1.1\nHost: 127.0.0.1\nAuthorization: Bearer s3cret\n"
            "Content-Type: application/json\nContent-Length: 4097\n"
        ),
    )
    assert status == 413 and headers["connection"] == "close" and b"4096 bytes" in body
