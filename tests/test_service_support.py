"""Helpers for the service tests that start a real uvicorn server (imported by them; holds
no tests itself): a free port, the server as a subprocess of `restwise server api`, tokens."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "restwise.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def create_token(data_dir: Path, role: str, name: str) -> str:
    """A token made by the real CLI command (`restwise server token create --json`)."""
    out = cli("server", "token", "create", "--role", role, "--name", name, "--json", "--data-dir", str(data_dir))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])["token"]


class LiveServer:
    """`restwise server api` on 127.0.0.1 and a free port, as its own process."""

    def __init__(self, data_dir: Path, *extra: str, runner_command: tuple[str, ...] = ()):
        self.data_dir = Path(data_dir)
        self.log = self.data_dir / "server.log"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if runner_command:
            extra = (*extra, "--runner-command", shlex.join(runner_command))
        # free_port() cannot reserve the port: another process (a parallel worker, a Flower
        # process) may bind it before the service does. Only that case is retried, on a new port.
        for _ in range(3):
            if self._start(extra):
                return
        raise RuntimeError(f"the server could not bind a free port in 3 attempts: {self.log.read_text()[-2000:]}")

    def _start(self, extra: tuple[str, ...]) -> bool:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "restwise.cli", "server", "api", "--port", str(self.port), "--data-dir", str(self.data_dir), *extra]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                text = self.log.read_text()
                if "address already in use" in text:
                    return False
                raise RuntimeError(f"the server exited: {text[-2000:]}")
            try:
                if httpx.get(f"{self.base}/api/v1/health", timeout=1).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server did not come up in 60 s")

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
