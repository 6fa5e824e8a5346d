"""objhttp's ranged GETs against a scripted HTTP server on 127.0.0.1: every
answer is checked (a wrong Content-Range or a short body is EIO, never
zeros), a kept-alive connection the server dropped is retried once on a
fresh one, server errors are retried, each thread has its own connection,
and HTTPS verifies as the s3fs client's ``verify`` says."""

from __future__ import annotations

import contextlib
import datetime
import errno
import ipaddress
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers import child_status
from vnpager.vfs import objhttp
from vnpager.vfs.objhttp import NotRanged, RangeReader, StatusError, Target
from vnpager.vfs.objstore import S3Store

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
    """An HTTP/1.1 server answering each request as *script* says (HTTPS
    with *tls*); counts the connections it accepted."""

    def __init__(self, script: Script, tls: ssl.SSLContext | None = None) -> None:
        self.script, self.connections, self.tls = script, 0, tls
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.sock.getsockname()[1]}/obj"
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
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except OSError:  # the client refused our certificate
                conn.close()
                return
            self._conns.append(conn)
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
def serve() -> Iterator[Callable[..., Scripted]]:
    servers: list[Scripted] = []

    def start(script: Script, tls: ssl.SSLContext | None = None) -> Scripted:
        servers.append(Scripted(script, tls))
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


def test_objhttp_reads_into_every_buffer_on_one_kept_alive_connection(serve: Callable[..., Scripted]
                                                                      ) -> None:
    server = serve(lambda c, r, rng: (ranged(rng), False))
    reader = RangeReader()
    assert _read(reader, server, 100, [4096, 10, 4096]) == DATA[100:100 + 8202]
    assert _read(reader, server, 0, [16]) == DATA[:16]
    assert server.connections == 1


def test_objhttp_wrong_content_range_is_eio(serve: Callable[..., Scripted]) -> None:
    server = serve(lambda c, r, rng: (ranged(rng, cr=f"bytes 0-99/{len(DATA)}"), False))
    with pytest.raises(OSError) as ei:
        _read(RangeReader(), server, 4096, [100])
    assert ei.value.errno == errno.EIO and "Content-Range" in str(ei.value)


def test_objhttp_short_body_is_eio_not_zeros(serve: Callable[..., Scripted]) -> None:
    """The server says 4096 bytes and sends 4000, then closes."""
    server = serve(lambda c, r, rng: (ranged(rng, cut=96), True))
    with pytest.raises(OSError) as ei:
        _read(RangeReader(), server, 0, [2048, 2048])
    assert ei.value.errno == errno.EIO and "short body" in str(ei.value)


def test_objhttp_dropped_connection_is_retried_once_on_a_fresh_one(serve: Callable[..., Scripted]
                                                                   ) -> None:
    """The server closes each connection after its first answer without
    saying so (as an idle keep-alive times out): the next GET finds the
    connection dropped and is sent again on a new one."""
    server = serve(lambda c, r, rng: (ranged(rng), True))
    reader = RangeReader()
    assert _read(reader, server, 0, [64]) == DATA[:64]
    assert _read(reader, server, 64, [64]) == DATA[64:128]
    assert server.connections == 2


def test_objhttp_a_fresh_connection_dropped_is_eio(serve: Callable[..., Scripted]) -> None:
    server = serve(lambda c, r, rng: (b"", True))  # closes without answering
    with pytest.raises(OSError) as ei:
        _read(RangeReader(), server, 0, [64])
    assert ei.value.errno == errno.EIO
    assert server.connections == 1  # not retried: the server itself is the trouble


def test_objhttp_server_errors_are_retried(serve: Callable[..., Scripted],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(objhttp, "BACKOFF", 0.001)
    answers = iter([status(503, "Slow Down"), status(500, "Internal")])
    server = serve(lambda c, r, rng: (next(answers, None) or ranged(rng), False))
    assert _read(RangeReader(), server, 10, [10]) == DATA[10:20]
    failing = serve(lambda c, r, rng: (status(503, "Slow Down"), False))
    with pytest.raises(StatusError) as ei:
        _read(RangeReader(), failing, 10, [10])
    assert ei.value.status == 503


def test_objhttp_error_status_carries_s3s_code(serve: Callable[..., Scripted]) -> None:
    xml = b"<?xml version='1.0'?><Error><Code>NoSuchKey</Code><Message>gone</Message></Error>"
    server = serve(lambda c, r, rng: (status(404, "Not Found", xml) if r == 1 else ranged(rng), False))
    reader = RangeReader()
    with pytest.raises(StatusError) as ei:
        _read(reader, server, 0, [10])
    assert (ei.value.status, ei.value.code, ei.value.message) == (404, "NoSuchKey", "gone")
    assert _read(reader, server, 0, [10]) == DATA[:10]  # the error's body read: the connection kept
    assert server.connections == 1


def test_objhttp_whole_body_or_redirect_is_not_ranged(serve: Callable[..., Scripted]) -> None:
    whole = serve(lambda c, r, rng: (f"HTTP/1.1 200 OK\r\nContent-Length: {len(DATA)}\r\n\r\n".encode()
                                     + DATA, False))
    moved = serve(lambda c, r, rng: (b"HTTP/1.1 302 Found\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n",
                                     False))
    for server in (whole, moved):
        with pytest.raises(NotRanged):
            _read(RangeReader(), server, 0, [10])


def test_objhttp_each_thread_has_its_own_connection(serve: Callable[..., Scripted]) -> None:
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


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ssl.SSLContext]:
    """A self-signed certificate for 127.0.0.1 (its file, a CA bundle of
    one) and a server context serving it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vnpager test")])
    now = datetime.datetime.now(datetime.UTC)
    crt = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
           .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
           .not_valid_after(now + datetime.timedelta(days=1))
           .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                          critical=False)
           .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
           .sign(key, hashes.SHA256()))
    d = tmp_path_factory.mktemp("tls")
    (d / "crt.pem").write_bytes(crt.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    (d / "key.pem").write_bytes(pem)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(d / "crt.pem", d / "key.pem")
    return d / "crt.pem", server


def _s3_store(endpoint: str, **client_kwargs: object) -> S3Store:
    import s3fs

    return S3Store(s3fs.S3FileSystem(key="k", secret="s", skip_instance_cache=True, client_kwargs={
        "endpoint_url": endpoint, "region_name": "us-east-1", **client_kwargs}))


def test_objhttp_https_verifies_as_the_s3fs_client_says(serve: Callable[..., Scripted],
                                                         cert: tuple[Path, ssl.SSLContext]) -> None:
    """A presigned GET over HTTPS trusts the CA bundle the client's
    ``verify`` names, verifies against the system's by default (our
    self-signed certificate: EIO), and does not verify with verify=False."""
    crt, tls = cert
    server = serve(lambda c, r, rng: (ranged(rng), False), tls)
    endpoint = server.url.removesuffix("/obj")
    for verify, ok in ((str(crt), True), (None, False), (False, True)):
        store = _s3_store(endpoint, **({} if verify is None else {"verify": verify}))
        buf = bytearray(100)
        if ok:
            store.get_into("bucket/key", 200, [memoryview(buf)], None)
            assert buf == DATA[200:300]
        else:
            with pytest.raises(OSError) as ei:
                store.get_into("bucket/key", 200, [memoryview(buf)], None)
            assert ei.value.errno == errno.EIO and "CERTIFICATE_VERIFY_FAILED" in str(ei.value)
        assert store.stats.snapshot()["signs"] == 1


def test_objhttp_s3_errors_map_as_s3fs(serve: Callable[..., Scripted]) -> None:
    """403 (on a URL just signed: not signed again) is EACCES, 412 ESTALE,
    404 ENOENT, others EIO; each with the server's message."""
    answers = [(403, "AccessDenied", errno.EACCES), (412, "PreconditionFailed", errno.ESTALE),
               (404, "NoSuchKey", errno.ENOENT), (416, "InvalidRange", errno.EIO)]

    def script(c: int, r: int, rng: str) -> tuple[bytes, bool]:
        code, s3code, _ = answers[r - 1]
        return status(code, "No", f"<Error><Code>{s3code}</Code><Message>said {code}</Message></Error>"
                      .encode()), False

    server = serve(script)
    store = _s3_store(server.url.removesuffix("/obj"))
    for code, _, want in answers:
        with pytest.raises(OSError) as ei:
            store.get_into("bucket/key", 0, [memoryview(bytearray(10))], None)
        assert ei.value.errno == want and f"said {code}" in str(ei.value)
    st = store.stats.snapshot()
    assert st["errors"] == len(answers) and st["signs"] == 1 and server.connections == 1


def test_objhttp_s3_400_goes_fsspecs_way(serve: Callable[..., Scripted]) -> None:
    """A presigned GET answered 400 (a bucket in another region, say) is
    made again by s3fs's get_object, whose botocore can mend it."""
    xml = b"<Error><Code>AuthorizationHeaderMalformed</Code><Message>region</Message></Error>"
    server = serve(lambda c, r, rng: (status(400, "Bad Request", xml) if (c, r) == (1, 1) else ranged(rng),
                                      False))
    store = _s3_store(server.url.removesuffix("/obj"))
    buf = bytearray(100)
    store.get_into("bucket/key", 300, [memoryview(buf)], None)
    assert buf == DATA[300:400]
    st = store.stats.snapshot()
    assert st["gets"] == 1 and st["errors"] == 0 and st["signs"] == 1
    assert server.connections == 2  # ours, then aiohttp's


@pytest.mark.filterwarnings("ignore:This process .*multi-threaded:DeprecationWarning")
def test_objhttp_a_forked_child_makes_its_own_connection(serve: Callable[..., Scripted]) -> None:
    """The parent's kept-alive socket is the parent's: a forked child's GET
    opens another (the server sees a second connection)."""
    server = serve(lambda c, r, rng: (ranged(rng), False))
    reader = RangeReader()
    assert _read(reader, server, 0, [10]) == DATA[:10]
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        ok = False
        with contextlib.suppress(BaseException):
            ok = _read(reader, server, 10, [10]) == DATA[10:20]
        os._exit(0 if ok else 1)
    assert child_status(pid, 30) == 0
    assert server.connections == 2
    assert _read(reader, server, 20, [10]) == DATA[20:30]  # the parent's own still serves
