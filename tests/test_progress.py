"""prunekit._progress: the one "progress=None means a terminal" rule and the bar every module draws."""

from __future__ import annotations

import io
import sys

import pytest

from prunekit._progress import progress_bar, resolve_progress


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.mark.parametrize("tty", [False, True])
def test_none_means_stderr_is_a_terminal(monkeypatch, tty):
    monkeypatch.setattr(sys, "stderr", _Stream(tty))
    assert resolve_progress(None) is tty
    assert resolve_progress(True) is True and resolve_progress(False) is False


@pytest.mark.parametrize("bad", [1, 0, "yes", 1.0])
def test_a_non_bool_is_refused(bad):
    with pytest.raises(TypeError, match="progress must be True, False or None"):
        resolve_progress(bad)


def test_the_bar_draws_on_stderr_only_when_asked(monkeypatch):
    stream = _Stream(False)
    monkeypatch.setattr(sys, "stderr", stream)
    with progress_bar(None, total=2, desc="quiet", unit="step") as bar:
        bar.update(2)
    assert stream.getvalue() == ""
    with progress_bar(True, range(3), desc="shown", unit="step") as bar:
        assert list(bar) == [0, 1, 2]
    assert "shown" in stream.getvalue() and "3/3" in stream.getvalue()
