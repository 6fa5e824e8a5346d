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


def remove_bucket(fs: Any, name: str) -> None:
    """Abort the bucket's unfinished uploads, delete every version of every object, then
    the bucket: objects live in the OSD's memory.  Through S3, not ``radosgw-admin bucket
    rm --purge-objects``: that is a process a bucket (0.4 s), and with ``--bypass-gc``
    Ceph 16.2.15's crashes on an unfinished upload."""
    for up in fs.call_s3("list_multipart_uploads", Bucket=name).get("Uploads", []):
        fs.call_s3("abort_multipart_upload", Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
    while True:
        listing = fs.call_s3("list_object_versions", Bucket=name)
        gone = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                for v in listing.get("Versions", []) + listing.get("DeleteMarkers", [])]
        if not gone:
            break
        fs.call_s3("delete_objects", Bucket=name, Delete={"Objects": gone, "Quiet": True})
    fs.call_s3("delete_bucket", Bucket=name)
    fs.invalidate_cache(name)
