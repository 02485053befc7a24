import os
import sys

import pytest

# tests import the top-level modules (rubric, judge, rollout, ...) from the repository root
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)  # tests read data/ and run the scripts by relative path, from any working directory


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium from Debian's package, driven by Playwright. CI installs both (.ci/run);
    elsewhere the browser tests skip, saying what to install, unless POLARIS_REQUIRE_BROWSER=1."""
    exe = next((p for p in ("/usr/lib/chromium/chromium-headless-shell", "/usr/bin/chromium") if os.path.exists(p)), None)
    why = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        why = "pip install playwright"
    if why is None and exe is None:
        why = "apt-get install chromium-headless-shell (Debian's package)"
    if why:
        if os.environ.get("POLARIS_REQUIRE_BROWSER"):
            pytest.fail(f"no browser for the page tests: {why}")
        pytest.skip(f"the page tests need headless Chromium: {why}")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-background-networking",
                                                          "--disable-component-update", "--disable-sync"])
        yield b
        b.close()
