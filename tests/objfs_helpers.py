"""A local S3 for the objfs tests: moto's server on 127.0.0.1 (quick unit
tests; the integration tests run against Ceph's RGW), and what they share."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from typing import Any

# moto reads its part minimum when imported: small parts keep the tests small
os.environ.setdefault("S3_UPLOAD_PART_MIN_SIZE", str(64 * 1024))
for _var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
    os.environ.setdefault(_var, "testing")

import boto3  # noqa: E402 (after the environment)
import s3fs  # noqa: E402 (after the environment)
from moto.server import ThreadedMotoServer  # noqa: E402 (after the environment)

from vnpager import VM  # noqa: E402

MOTO_MIN_PART = int(os.environ["S3_UPLOAD_PART_MIN_SIZE"])


def checked_vm(physmem: int) -> Iterator[VM]:
    """A VM of *physmem* bytes for one test: closed after it (which publishes
    what its objects staged), its invariants checked."""
    machine = VM(physmem=physmem)
    yield machine
    machine.close()
    machine.check_invariants()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def moto_server() -> Iterator[str]:
    """Run moto's S3 on 127.0.0.1 for as long as the generator lives; its endpoint."""
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def s3_client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def new_bucket(endpoint: str, versioned: bool = False) -> str:
    """A new, empty bucket."""
    name = f"b-{uuid.uuid4().hex[:12]}"
    client = s3_client(endpoint)
    client.create_bucket(Bucket=name)
    if versioned:
        client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


def new_s3fs(endpoint: str) -> s3fs.S3FileSystem:
    """An s3fs of its own (not fsspec's cached instance): a test may wrap its calls."""
    return s3fs.S3FileSystem(key="testing", secret="testing", skip_instance_cache=True,
                             client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"})


def slow_and_failing(fs: s3fs.S3FileSystem, delay: dict[str, float] | None = None,
                     fail: dict[str, int] | None = None) -> Callable[[], None]:
    """Make *fs*'s S3 calls of some methods sleep (*delay*, seconds) or fail
    (*fail*: how many times, with EIO); returns the undo."""
    real = fs._call_s3
    delay, fail = delay or {}, fail or {}

    async def call(method: str, *args: Any, **kwargs: Any) -> Any:
        if fail.get(method, 0) > 0:
            fail[method] -= 1
            raise OSError(5, f"injected failure of {method}")
        if method in delay:
            await asyncio.sleep(delay[method])
        return await real(method, *args, **kwargs)

    fs._call_s3 = call  # type: ignore[method-assign]
    return lambda: setattr(fs, "_call_s3", real)
