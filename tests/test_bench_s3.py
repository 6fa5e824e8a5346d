"""``vnpager bench --s3`` (vnpager.tools.bench_s3): the server's ops log
read back whole, and a tiny run on the session's RGW that measures every
reader and counts each one's requests and bytes as the server saw them.
The figures' sizes are not checked: timing is the benchmark's business."""

from __future__ import annotations

import json
from pathlib import Path

from vnpager.tools import bench_s3
from vnpager.tools.objservers import CephRGW

TINY = bench_s3.S3Config(object_size=2 << 20, physmem=1 << 20, random_reads=16, dirty_pages=8)


def test_the_ops_log_is_read_whole_even_where_an_entry_ends_no_line(tmp_path: Path) -> None:
    log = tmp_path / "ops.log"
    entries = [{"uri": f"GET /b/k{i} HTTP/1.1", "operation": "get_obj", "bytes_sent": i} for i in range(4)]
    log.write_text(json.dumps(entries[0]) + "\n" + json.dumps(entries[1]) + json.dumps(entries[2]) + "\n")
    ops = bench_s3.OpsLog(log)
    assert ops.since(0) == entries[:3]
    mark = ops.mark()
    with open(log, "a") as f:
        f.write(json.dumps(entries[3]))
    assert ops.since(mark) == entries[3:]
    row = bench_s3.count(bench_s3.Row("c", "r", 0.0, "MB/s", 1), ops.since(0))
    assert (row.gets, row.fetched) == (4, 0 + 1 + 2 + 3)


def test_the_server_is_busy_for_the_union_of_its_requests() -> None:
    assert bench_s3._busy([(0.0, 1.0), (0.5, 2.0), (3.0, 3.5), (3.5, 4.0)]) == (3.0, 2)
    assert bench_s3._busy([]) == (0.0, 0)
    row = bench_s3.count(bench_s3.Row("c", "r", 0.0, "MB/s", 1, elapsed=2.0), [
        {"uri": "GET /b/k HTTP/1.1", "operation": "get_obj", "bytes_sent": 1, "total_time": 500,
         "time": "2026-12-02T04:17:58.000000Z"},
        {"uri": "GET /b/k HTTP/1.1", "operation": "get_obj", "bytes_sent": 1, "total_time": 300,
         "time": "2026-12-02T04:17:58.400000Z"}])
    assert row.server == {"get_obj": [2, 800]} and row.most == 2 and abs(row.busy - 0.7) < 1e-6
    assert bench_s3.profile(row) == ("server: get_obj 2 x 400.0 ms; serving 0.7 s of the case's 2.0 s (35%), "
                                     "at most 2 at once")


def test_a_tiny_run_measures_every_reader_and_counts_what_the_server_served(rgw: CephRGW) -> None:
    report = bench_s3.run(TINY, lambda _: None, rgw)
    seq = report.case("sequential read")
    assert {"vnpager", "s3fs readahead", "s3fs blockcache"} <= set(seq)
    for row in seq.values():
        assert row.used == TINY.object_size  # each read the object whole
        assert row.gets >= 1 and row.fetched >= row.used  # and the server sent every byte
        assert row.server["get_obj"][0] == row.gets and row.busy > 0 and row.most >= 1
    assert set(report.case("random 4 KiB reads")) == set(seq) - set(bench_s3.SEQUENTIAL_ONLY)
    for row in report.case("random 4 KiB reads").values():
        assert row.used == TINY.random_reads * bench_s3.PAGE and row.gets >= 1
    write = report.case("write pages, publish")
    dirty = TINY.dirty_pages * bench_s3.PAGE
    assert write["vnpager"].used == dirty
    assert write["vnpager"].uploaded >= dirty  # the new version has the pages
    whole = write["s3fs whole object"]
    assert whole.fetched == whole.uploaded == TINY.object_size  # down and up again, whole
    for name in ("sequential read", "random 4 KiB reads", "write pages, publish"):
        vnpager = report.case(name)["vnpager"]
        assert vnpager.met is not None and vnpager.ratio is not None
    assert "vnpager" in "\n".join(bench_s3.markdown(report))
