"""objstore.plan_parts: the parts of a publish, under a server's limits."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vnpager.vfs.objstore import Part, PartPolicy, plan_parts

PS = 4096


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    """Dirty runs of the given page numbers, merged."""
    runs: list[tuple[int, int]] = []
    for p in sorted(set(pages)):
        if runs and runs[-1][1] == p * PS:
            runs[-1] = (runs[-1][0], p * PS + PS)
        else:
            runs.append((p * PS, p * PS + PS))
    return runs


def _check(parts: list[Part], size: int, clean_end: int, dirty: list[tuple[int, int]],
           policy: PartPolicy) -> None:
    assert parts[0].start == 0 and parts[-1].end == size
    assert all(a.end == b.start for a, b in itertools.pairwise(parts))
    assert all(p.end - p.start >= policy.min_part for p in parts[:-1])
    assert all(p.end - p.start <= policy.max_part for p in parts)
    assert len(parts) <= policy.max_parts
    for p in parts:
        if p.copy:  # a copy holds nothing dirty, nothing past the old version
            assert p.end <= clean_end
            assert not any(a < p.end and p.start < b for a, b in dirty)


@settings(max_examples=300, deadline=None)
@given(npages=st.integers(16, 600), data=st.data(), min_pages=st.integers(1, 16),
       max_parts=st.integers(1, 40), shrink=st.integers(0, 8))
def test_plan_parts_obeys_the_limits(npages: int, data: st.DataObject, min_pages: int, max_parts: int,
                                     shrink: int) -> None:
    min_pages = min(min_pages, npages)
    pages = data.draw(st.lists(st.integers(0, npages - 1), max_size=40))
    size = npages * PS - data.draw(st.integers(0, PS - 1))
    clean_end = max(0, size - shrink * PS)
    policy = PartPolicy(min_part=min_pages * PS, max_part=max(min_pages * PS, 64 * PS), max_parts=max_parts,
                        upload_part=data.draw(st.integers(1, 32)) * PS)
    dirty = _runs(pages)
    try:
        parts = plan_parts(size, clean_end, dirty, policy)
    except ValueError:  # only when the object cannot fit max_parts parts of max_part
        assert -(-size // policy.max_part) > max_parts
        return
    _check(parts, size, clean_end, dirty, policy)


def test_plan_parts_uploads_follow_the_dirty_bytes() -> None:
    """The issue's case, at 1/16 the size: 4 MiB of random pages in a 64 MiB
    object, with RGW's small parts: with upload_ratio 1 the uploaded bytes
    are the dirty ones; by default up to twice them, the shortest gaps
    joined, in fewer parts."""
    size = 64 << 20
    rnd = random.Random(1)
    dirty = _runs(rnd.sample(range(size // PS), (4 << 20) // PS))
    ndirty = sum(b - a for a, b in dirty)
    exact = PartPolicy(min_part=PS, max_parts=100_000, upload_ratio=1)
    parts = plan_parts(size, size, dirty, exact)
    _check(parts, size, size, dirty, exact)
    assert _uploaded(parts) == ndirty
    policy = PartPolicy(min_part=PS, max_parts=100_000)
    joined = plan_parts(size, size, dirty, policy)
    _check(joined, size, size, dirty, policy)
    assert ndirty < _uploaded(joined) <= 2 * ndirty
    assert len(joined) < 0.8 * len(parts)


def test_plan_parts_join_the_shortest_gaps_first() -> None:
    dirty = _runs([0, 2, 10, 13, 40])  # gaps of 1, 7, 2 and 26 pages
    policy = PartPolicy(min_part=PS, upload_ratio=1.6)  # 3 pages to spare: the gaps of 1 and 2
    parts = plan_parts(64 * PS, 64 * PS, dirty, policy)
    assert [(p.start // PS, p.end // PS) for p in parts if not p.copy] == [(0, 3), (10, 14), (40, 41)]


def _uploaded(parts: list[Part]) -> int:
    return sum(p.end - p.start for p in parts if not p.copy)


def test_plan_parts_coalesce_under_max_parts() -> None:
    size = 1024 * PS
    dirty = _runs(list(range(0, 1024, 8)))  # 128 runs: 256 parts without the limit
    policy = PartPolicy(min_part=PS, max_parts=32)
    parts = plan_parts(size, size, dirty, policy)
    _check(parts, size, size, dirty, policy)
    assert len(dirty) * PS < _uploaded(parts) < size  # gaps joined, not everything


def test_part_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        PartPolicy(min_part=0)
    with pytest.raises(ValueError):
        PartPolicy(min_part=2 * PS, max_part=PS)
    with pytest.raises(ValueError):
        PartPolicy(upload_ratio=0.5)


def test_plan_parts_cut_a_new_object_into_upload_parts() -> None:
    policy = PartPolicy(min_part=PS, upload_part=16 * PS, max_parts=10)
    parts = plan_parts(100 * PS, 0, [], policy)
    _check(parts, 100 * PS, 0, [], policy)
    assert len(parts) == 6 and not any(p.copy for p in parts)  # 100 // 16 pieces, no more
