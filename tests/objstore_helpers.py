"""What the object-store fixtures (conftest.py) hand to tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vnpager.tools.objstore import S3User

LATENCY = 0.05  # seconds added to each request by the rgw_latency fixture


@dataclass
class Bucket:
    """A fresh S3 bucket on the session's RGW: ``fs`` is an s3fs filesystem on it
    (version-aware in a versioned bucket); ``url`` is ``s3://name``."""

    name: str
    user: S3User
    fs: Any

    @property
    def url(self) -> str:
        return f"s3://{self.name}"

    def path(self, key: str) -> str:
        return f"{self.name}/{key}"


@dataclass
class WebDir:
    """A fresh directory served by the session's nginx: file ``dir / name`` is at ``url + '/' + name``."""

    dir: Path
    url: str
