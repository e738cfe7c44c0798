"""Shared pytest configuration: the lab fixtures and the golden-file switch."""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--regenerate", action="store_true", default=False,
                     help="rewrite golden files in tests/data from the current output")


@pytest.fixture
def regenerate(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--regenerate"))


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With ``VIRTSYNC_NO_SKIPS=1`` (CI) a skipped test fails the run: on a machine
    set up by ``make setup`` every test can run, and a skip would prove nothing."""
    if os.environ.get("VIRTSYNC_NO_SKIPS") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        for report in skipped[:10]:
            print(f"\nskipped under VIRTSYNC_NO_SKIPS=1: {report.nodeid}: {report.longrepr}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
