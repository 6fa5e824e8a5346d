"""``vnpager torture``, briefly (issue 4, point 8): mixed work under injected
faults loses nothing acknowledged.  Longer runs are for people."""

from __future__ import annotations

import pytest

from vnpager.tools.cli import main
from vnpager.tools.torture import Config, torture


@pytest.mark.parametrize("seed", [1, 2])
def test_torture_under_faults(seed: int) -> None:
    fig, injected, hung = torture(Config(seconds=2, seed=seed, hang_grace=30))
    assert not hung and not fig.problems and fig.mismatches == 0
    # the faults happened and were reported, and the checks had something to check
    assert injected and fig.errors > 0 and fig.bytes_verified > 0
    assert {"write EIO", "write ENOSPC", "read EIO"} <= set(injected)


def test_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["torture", "--seconds", "1", "--seed", "7", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    for line in ("operations done:", "faults injected:", "errors surfaced:", "bytes verified:",
                 "mismatches:       0"):
        assert line in out
