"""Processes for the hardware-MMU tests: a client (tests/hw_user.py) and
a server, each a subprocess, every wait bounded by DEADLINE."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
DEADLINE = 60.0


class Lines:
    """Lines of a pipe, each read within DEADLINE (select on the fd, with
    our own buffer: a file object's would hide a second line from select)."""

    def __init__(self, fd: int, what: str) -> None:
        self.fd, self.what, self.buf = fd, what, b""

    def readline(self, timeout: float = DEADLINE) -> str:
        """The next line; '' at end of file; TimeoutError after *timeout*."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(0.0, left))
            if not ready:
                raise TimeoutError(f"{self.what}: no line in {timeout} s")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                line, self.buf = self.buf, b""
                return line.decode()
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode() + "\n"


def address() -> str:
    return f"@vnpager-test-{os.getpid()}-{secrets.token_hex(4)}"


class Client:
    """A client process; :meth:`do` sends a command and returns its answer."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HERE / "hw_user.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        self.lines = Lines(self.proc.stdout.fileno(), "client")

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def answer(self) -> dict[str, Any]:
        line = self.lines.readline()
        if not line:
            raise EOFError(f"the client exited ({self.proc.wait(DEADLINE)})")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def do(self, **cmd: Any) -> Any:
        self.send(**cmd)
        reply = self.answer()
        if "error" in reply:
            raise AssertionError(f"{cmd}: {reply['error']}")
        return reply["ok"]

    def error(self, **cmd: Any) -> list[Any]:
        """The [type, errno, message] the command raised."""
        self.send(**cmd)
        reply = self.answer()
        assert "error" in reply, f"{cmd} did not fail: {reply}"
        error: list[Any] = reply["error"]
        return error

    def exit(self) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                self.send(op="exit")
        try:
            return self.proc.wait(DEADLINE)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(DEADLINE)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


class ServerProc:
    """A server process at a fresh abstract address: ``vnpager serve``, or
    the test's own (hw_fake_server.py) with ``fake=True``."""

    def __init__(self, physmem: str = "16M", *, fake: bool = False, path: str | None = None) -> None:
        self.path = path or address()
        cmd = ([sys.executable, str(HERE / "hw_fake_server.py"), self.path] if fake else
               [sys.executable, "-m", "vnpager", "serve", "--socket", self.path, "--physmem", physmem])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stream = self.proc.stdout if fake else self.proc.stderr
        assert stream is not None
        lines = Lines(stream.fileno(), "server")
        try:
            while line := lines.readline():
                if "ready" in line or "listening" in line:
                    return
        except TimeoutError:
            pass
        self.stop()
        raise RuntimeError(f"the server did not start: {self.proc.returncode}")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(DEADLINE)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(DEADLINE)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()
        return self.proc.returncode
