"""An object's page tree (PageTree): lookups and walks in offset order
agree with a plain sorted map under any mix of inserts and removals."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from vnpager.uvm.uvm_object import PageTree

PS = 4096
_pages = st.integers(min_value=0, max_value=300)  # several 64-page chunks, and their edges


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), _pages), max_size=200), _pages, _pages)
def test_page_tree_agrees_with_a_sorted_map(ops: list[tuple[bool, int]], a: int, b: int) -> None:
    tree, model = PageTree(PS), {}
    for insert, pn in ops:
        off = pn * PS
        if insert:
            tree[off] = model[off] = pn  # type: ignore[assignment]
        elif off in model:
            del tree[off], model[off]
    assert len(tree) == len(model) and list(tree) == sorted(model)
    assert tree.values() == [model[off] for off in sorted(model)]
    lo, hi = min(a, b) * PS - PS // 2, max(a, b) * PS + PS // 2  # unaligned bounds
    assert list(tree.irange(lo, hi)) == [off for off in sorted(model) if lo <= off < hi]
    assert all(tree.get(off) == model.get(off) and (off in tree) == (off in model)
               for off in range(0, 301 * PS, PS))


def test_page_tree_irange_of_an_empty_or_inverted_range_is_empty() -> None:
    tree = PageTree(PS)
    tree[0] = tree[64 * PS] = None  # type: ignore[assignment]
    assert list(tree.irange(PS, PS)) == [] and list(tree.irange(5 * PS, PS)) == []
    assert list(tree.irange(-PS, 65 * PS)) == [0, 64 * PS]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), _pages, st.integers(min_value=1, max_value=80)), max_size=40),
       _pages, _pages)
def test_page_tree_run_forms_agree_with_a_sorted_map(ops: list[tuple[bool, int, int]],
                                                      a: int, b: int) -> None:
    """insert_run and remove_run (a read's and a free's pages), absent_run
    and pages_in (both of its ways) agree with the per-page operations."""
    tree, model = PageTree(PS), {}
    for insert, pn, n in ops:
        if insert:
            n = tree.absent_run(pn * PS, n)
            assert n == next((i for i in range(n) if (pn + i) * PS in model), n)
            tree.insert_run(pn * PS, [pn + i for i in range(n)])  # type: ignore[misc]
            model.update({(pn + i) * PS: pn + i for i in range(n)})
        else:
            gone = [off for off in sorted(model) if pn * PS <= off < (pn + n) * PS]
            tree.remove_run(gone)
            for off in gone:
                del model[off]
    assert list(tree) == sorted(model) and len(tree) == len(model)
    lo, hi = min(a, b) * PS - PS // 2, max(a, b) * PS + PS // 2
    want = [model[off] for off in sorted(model) if lo <= off < hi]
    assert tree.pages_in(lo, hi) == want
    assert tree.pages_in(lo, hi + 1000 * PS) == [model[off] for off in sorted(model) if lo <= off]
