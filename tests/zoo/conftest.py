"""Record every zoo cell's outcome (pass / refused: message / fail: first line) into a JSON file.

The file is ``runs/zoo/coverage.json`` under the repository root (or
``$PRUNEKIT_ZOO_RESULTS``); a run of some cells updates those cells and keeps
the rest. ``python -m tests.zoo.coverage_table`` renders it into the README.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from prunekit._io import atomic_write_json

_OUTCOMES: dict[str, dict[str, dict[str, str]]] = {}
_CAPABILITY_TESTS = {"test_gradual", "test_save_load", "test_onnx", "test_accelerate", "test_oneshot",
                     "test_structural"}


def results_path(root: Path) -> Path:
    """Where the zoo's outcomes are written."""
    env = os.environ.get("PRUNEKIT_ZOO_RESULTS")
    return Path(env) if env else root / "runs" / "zoo" / "coverage.json"


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Tiny models: one intra-op thread each (the shared ``single_thread`` fixture)."""


def _first_line(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    text = re.sub(r"\x1b\[[0-9;]*m", "", text).strip()  # exporters colour their messages
    return text.splitlines()[0] if text else "failed"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    name = getattr(item, "originalname", item.name)
    if name not in _CAPABILITY_TESTS or not hasattr(item, "callspec"):
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        params = item.callspec.params
        cell = f"{params['family']}/{name[len('test_'):]}"
        props = dict(item.user_properties)
        refused, note = props.get("zoo_refused"), props.get("zoo_note")
        if report.passed:
            entry = ({"outcome": "refused", "message": refused} if refused else
                     {"outcome": "pass", "note": note} if note else {"outcome": "pass"})
        elif report.skipped:
            entry = {"outcome": "skipped", "message": _first_line(report)}
        else:
            entry = {"outcome": "fail", "message": _first_line(report)}
        _OUTCOMES.setdefault(cell, {})[str(params["seed"])] = entry


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _OUTCOMES:
        return
    path = results_path(Path(session.config.rootpath))
    try:
        previous = json.loads(path.read_text())
        cells = previous.get("cells", {}) if isinstance(previous, dict) else {}
    except (OSError, ValueError):
        cells = {}
    cells.update(_OUTCOMES)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"format": "prunekit-zoo-coverage", "version": 1,
                             "updated": time.strftime("%Y-%m-%d %H:%M:%S"), "cells": dict(sorted(cells.items()))})
