"""Chromium for the page tests: Debian's binary, driven by Playwright (`bash .ci/run` installs both)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ABSENT = f"{CHROMIUM} is absent (bash .ci/run installs Debian's chromium)"


def require_chromium() -> ModuleType:
    """At a test module's top: skips the module without Chromium or Playwright; `playwright.sync_api`."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(ABSENT, allow_module_level=True)
    return pytest.importorskip("playwright.sync_api")


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium browser (Playwright's `Browser`), closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
