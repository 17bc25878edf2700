"""Unlock once at `restwise device join`: a key agent for the ClientApp processes.

Flower 1.42 starts a fresh ClientApp process for every message a SuperNode receives
(``flwr-clientapp``, started by the SuperNode's ``flower-superexec``). Each needs the store's
data key. A passphrase store would have to ask for the passphrase five times per round; a
keystore (``restwise device keystore add``) is one answer, this agent the other:

* `restwise device join` unlocks the store once (passphrase prompt or file), keeps the data
  key in its own memory only, and stays the parent of the ``flower-supernode`` it starts;
* it listens on a Unix socket in a fresh private folder (``mkdtemp``: mode 0700, socket
  0600) named to the ClientApp through the SuperNode's node config (``key-agent=PATH``);
* a connecting process gets the key only if the kernel says (``SO_PEERCRED``) it runs as the
  same user **and** descends from the SuperNode this join started (its parent chain in
  ``/proc``). Anything else is refused and the refusal logged (no key material);
* the key is never written to disk, never put in an environment variable or a command line
  (both readable through ``/proc``); it dies with the join process (the SuperNode is started
  with ``PR_SET_PDEATHSIG`` so it does not outlive the agent either).

Linux only (``SO_PEERCRED``, ``/proc``): elsewhere the agent refuses to start, and the device
joins with a keystore instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import struct
import sys
import tempfile
import threading
from pathlib import Path

from restwise.client.errors import KeySlotError, KeystoreNotFoundError

_log = logging.getLogger(__name__)

PROTOCOL = b"restwise-key-agent/1"
REPLY_OK = b"OK "
REPLY_DENIED = b"DENIED\n"
REPLY_WRONG_STORE = b"WRONG-STORE\n"
MAX_REQUEST = 256
MAX_ANCESTRY = 64  # parent links followed before giving up


def agent_supported() -> str | None:
    """None when this platform can run the agent; otherwise why not."""
    if not sys.platform.startswith("linux") or not hasattr(socket, "SO_PEERCRED"):
        return "the key agent needs Linux (SO_PEERCRED); add a keystore with `restwise device keystore add`"
    if not Path("/proc/self/stat").exists():
        return "the key agent needs /proc; add a keystore with `restwise device keystore add`"
    return None


def parent_pid(pid: int) -> int | None:
    """The parent of ``pid`` from /proc/PID/stat, None when the process is gone."""
    try:
        data = Path(f"/proc/{int(pid)}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; the last ')' ends it.
    try:
        return int(data.rsplit(")", 1)[1].split()[1])
    except (IndexError, ValueError):
        return None


def descends_from(pid: int, ancestor: int) -> bool:
    """Is ``pid`` a (grand...)child of ``ancestor``? (``pid == ancestor`` is not.)"""
    current = pid
    for _ in range(MAX_ANCESTRY):
        parent = parent_pid(current)
        if parent is None or parent <= 1:
            return False
        if parent == ancestor:
            return True
        current = parent
    return False


def _runtime_dir() -> str | None:
    """``$XDG_RUNTIME_DIR`` (a per-user tmpfs, 0700) when usable, else the system temp dir."""
    path = os.environ.get("XDG_RUNTIME_DIR")
    if path:
        with contextlib.suppress(OSError):
            st = os.stat(path)
            if st.st_uid == os.getuid() and (st.st_mode & 0o077) == 0:
                return path
    return None


class KeyAgent:
    """Serves one store's data key to the descendants of one process (see module docstring).

    Use: ``agent = KeyAgent(key, store_id)``; start the SuperNode; ``agent.serve_descendants_of
    (supernode_pid)``; ... ; ``agent.close()`` (wipes the key, removes the socket folder)."""

    def __init__(self, data_key: bytes, store_id: str):
        problem = agent_supported()
        if problem is not None:
            raise KeySlotError(problem)
        self._key = bytearray(data_key)
        self.store_id = store_id
        self._folder = Path(tempfile.mkdtemp(prefix="restwise-agent-", dir=_runtime_dir()))
        self.path = self._folder / "agent.sock"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self._sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        self._sock.listen(16)
        self._ancestor: int | None = None
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self.served = 0
        self.refused = 0

    def serve_descendants_of(self, pid: int) -> None:
        """Start answering requests from processes that descend from ``pid``."""
        self._ancestor = int(pid)
        self._thread = threading.Thread(target=self._serve, name="restwise-key-agent", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    self._answer(conn)
                except OSError:
                    continue

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(5.0)
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        request = conn.recv(MAX_REQUEST)  # read first: closing on unread data would reset the reply
        if uid != os.getuid() or self._ancestor is None or not descends_from(pid, self._ancestor):
            self.refused += 1
            _log.warning("key agent: refused a request from process %d (not this device's ClientApp)", pid)
            conn.sendall(REPLY_DENIED)
            return
        proto, _, store_id = request.strip().partition(b" ")
        if proto != PROTOCOL or store_id.decode("ascii", "replace") != self.store_id:
            conn.sendall(REPLY_WRONG_STORE)
            return
        conn.sendall(REPLY_OK + bytes(self._key))
        self.served += 1

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for i in range(len(self._key)):
            self._key[i] = 0
        shutil.rmtree(self._folder, ignore_errors=True)

    def __enter__(self) -> "KeyAgent":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def request_key(path: Path | str, store_id: str, *, timeout_s: float = 10.0) -> bytes:
    """Ask the agent at ``path`` for the data key of store ``store_id``.

    Raises :class:`KeystoreNotFoundError` when no agent answers there (the join that unlocked
    the store has ended) and :class:`KeySlotError` when it refuses."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise KeystoreNotFoundError(
                "the key agent of `restwise device join` is not running (the join that unlocked "
                "this store has ended): start `restwise device join` again"
            ) from None
        sock.sendall(PROTOCOL + b" " + store_id.encode("ascii") + b"\n")
        reply = b""
        while len(reply) < len(REPLY_OK) + 32:
            chunk = sock.recv(64)
            if not chunk:
                break
            reply += chunk
    except OSError as exc:
        raise KeySlotError(f"the key agent did not answer ({type(exc).__name__})") from None
    finally:
        sock.close()
    if reply.startswith(REPLY_OK) and len(reply) == len(REPLY_OK) + 32:
        return reply[len(REPLY_OK):]
    if reply == REPLY_WRONG_STORE:
        raise KeySlotError("the key agent holds the key of another store")
    raise KeySlotError("the key agent refused this process (only the ClientApps of its own SuperNode get the key)")


__all__ = ["KeyAgent", "request_key", "agent_supported", "descends_from", "parent_pid"]
