"""objhttp's ranged GETs against a scripted HTTP server on 127.0.0.1: every
answer is checked (a wrong Content-Range or a short body is EIO, never
zeros), a kept-alive connection the server dropped is retried once on a
fresh one, server errors are retried, and each thread has its own
connection."""

from __future__ import annotations

import contextlib
import errno
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from vnpager.vfs import objhttp
from vnpager.vfs.objhttp import HTTPStatus, NotRanged, RangeReader, Target

DATA = bytes(range(256)) * 64  # 16 KiB

# (connection number, request number on it, Range header) -> (bytes to send, close after)
Script = Callable[[int, int, str], tuple[bytes, bool]]


def ranged(rng: str, *, cr: str | None = None, cut: int = 0) -> bytes:
    """A 206 of the range *rng* asks (``bytes=a-b``) of DATA: *cr* its
    Content-Range instead of the right one, *cut* bytes of the body left out."""
    a, b = (int(x) for x in rng.removeprefix("bytes=").split("-"))
    body = DATA[a:b + 1]
    head = (f"HTTP/1.1 206 Partial Content\r\nContent-Range: {cr or f'bytes {a}-{b}/{len(DATA)}'}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body[:len(body) - cut]


def status(code: int, reason: str, body: bytes = b"") -> bytes:
    return f"HTTP/1.1 {code} {reason}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


class Scripted:
    """An HTTP/1.1 server answering each request as *script* says; counts
    the connections it accepted."""

    def __init__(self, script: Script) -> None:
        self.script, self.connections = script, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/obj"
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn, self.connections), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket, number: int) -> None:
        f = conn.makefile("rb")
        with conn, f:
            for request in range(1, 100):
                lines = []
                while (line := f.readline()) not in (b"\r\n", b""):
                    lines.append(line.decode())
                if not lines:
                    return
                rng = next((x.split(":", 1)[1].strip() for x in lines if x.lower().startswith("range:")), "")
                out, close = self.script(number, request, rng)
                conn.sendall(out)
                if close:
                    return

    def close(self) -> None:
        self.sock.close()
        for conn in self._conns:  # kept alive by a client: end its server thread's wait
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(timeout=10)


@pytest.fixture
def serve() -> Iterator[Callable[[Script], Scripted]]:
    servers: list[Scripted] = []

    def start(script: Script) -> Scripted:
        servers.append(Scripted(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _read(reader: RangeReader, server: Scripted, start: int, sizes: list[int]) -> bytes:
    bufs = [memoryview(bytearray(n)) for n in sizes]
    t = Target.of(server.url)
    assert t is not None
    reader.get_into(t, start, bufs)
    return b"".join(bytes(b) for b in bufs)


def test_objhttp_reads_into_every_buffer_on_one_kept_alive_connection(serve: Callable[[Script], Scripted]
                                                                      ) -> None:
    server = serve(lambda c, r, rng: (ranged(rng), False))
    reader = RangeReader()
    assert _read(reader, server, 100, [4096, 10, 4096]) == DATA[100:100 + 8202]
    assert _read(reader, server, 0, [16]) == DATA[:16]
    assert server.connections == 1


def test_objhttp_wrong_content_range_is_eio(serve: Callable[[Script], Scripted]) -> None:
    server = serve(lambda c, r, rng: (ranged(rng, cr=f"bytes 0-99/{len(DATA)}"), False))
    with pytest.raises(OSError) as ei:
        _read(RangeReader(), server, 4096, [100])
    assert ei.value.errno == errno.EIO and "Content-Range" in str(ei.value)


def test_objhttp_short_body_is_eio_not_zeros(serve: Callable[[Script], Scripted]) -> None:
    """The server says 4096 bytes and sends 4000, then closes."""
    server = serve(lambda c, r, rng: (ranged(rng, cut=96), True))
    with pytest.raises(OSError) as ei:
        _read(RangeReader(), server, 0, [2048, 2048])
    assert ei.value.errno == errno.EIO and "short body" in str(ei.value)


def test_objhttp_dropped_connection_is_retried_once_on_a_fresh_one(serve: Callable[[Script], Scripted]
                                                                   ) -> None:
    """The server closes each connection after its first answer without
    saying so (as an idle keep-alive times out): the next GET finds the
    connection dropped and is sent again on a new one."""
    server = serve(lambda c, r, rng: (ranged(rng), True))
    reader = RangeReader()
    assert _read(reader, server, 0, [64]) == DATA[:64]
    assert _read(reader, server, 64, [64]) == DATA[64:128]
    assert server.connections == 2


def test_objhttp_a_fresh_connection_dropped_is_eio(serve: Callable[[Script], Scripted]) -> None:
    server = serve(lambda c, r, rng: (b"", True))  # closes without answering
    with pytest.raises(OSError) as ei:
        _read(RangeReader(), server, 0, [64])
    assert ei.value.errno == errno.EIO
    assert server.connections == 1  # not retried: the server itself is the trouble


def test_objhttp_server_errors_are_retried(serve: Callable[[Script], Scripted],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(objhttp, "BACKOFF", 0.001)
    answers = iter([status(503, "Slow Down"), status(500, "Internal")])
    server = serve(lambda c, r, rng: (next(answers, None) or ranged(rng), False))
    assert _read(RangeReader(), server, 10, [10]) == DATA[10:20]
    failing = serve(lambda c, r, rng: (status(503, "Slow Down"), False))
    with pytest.raises(HTTPStatus) as ei:
        _read(RangeReader(), failing, 10, [10])
    assert ei.value.status == 503


def test_objhttp_error_status_carries_s3s_code(serve: Callable[[Script], Scripted]) -> None:
    xml = b"<?xml version='1.0'?><Error><Code>NoSuchKey</Code><Message>gone</Message></Error>"
    server = serve(lambda c, r, rng: (status(404, "Not Found", xml) if r == 1 else ranged(rng), False))
    reader = RangeReader()
    with pytest.raises(HTTPStatus) as ei:
        _read(reader, server, 0, [10])
    assert (ei.value.status, ei.value.code, ei.value.message) == (404, "NoSuchKey", "gone")
    assert _read(reader, server, 0, [10]) == DATA[:10]  # the error's body read: the connection kept
    assert server.connections == 1


def test_objhttp_whole_body_or_redirect_is_not_ranged(serve: Callable[[Script], Scripted]) -> None:
    whole = serve(lambda c, r, rng: (f"HTTP/1.1 200 OK\r\nContent-Length: {len(DATA)}\r\n\r\n".encode()
                                     + DATA, False))
    moved = serve(lambda c, r, rng: (b"HTTP/1.1 302 Found\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n",
                                     False))
    for server in (whole, moved):
        with pytest.raises(NotRanged):
            _read(RangeReader(), server, 0, [10])


def test_objhttp_each_thread_has_its_own_connection(serve: Callable[[Script], Scripted]) -> None:
    server = serve(lambda c, r, rng: (ranged(rng), False))
    reader, got, errors = RangeReader(), [], []

    def one(i: int) -> None:
        try:
            got.append(_read(reader, server, i * 100, [100]) == DATA[i * 100:(i + 1) * 100])
            got.append(_read(reader, server, i * 100, [100]) == DATA[i * 100:(i + 1) * 100])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and got == [True] * 8
    assert server.connections == 4


def test_objhttp_targets() -> None:
    t = Target.of("https://h.example:8443/b/k?X-Amz-Signature=ab%2F")
    assert t == Target("https", "h.example", 8443, "/b/k?X-Amz-Signature=ab%2F")
    assert Target.of("http://h/a b") is None  # fsspec quotes it its own way
    assert Target.of("ftp://h/x") is None
