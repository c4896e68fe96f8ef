"""The app in a real headless Chromium (Debian's ``chromium`` package, driven by Playwright for Python).

Nothing is installed at run time. Without Chromium this test FAILS (it does not skip): install it with
``apt-get update && apt-get install -y chromium chromium-driver``. Never ``playwright install``.
The screenshot lands in ``test-artifacts/app.png`` under the repository (gitignored).
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from workbench.loading import from_memory
from workbench.tiny import build_tiny

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
MODEL = "tiny-llama"


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("the browser test needs Debian's Chromium, which is not installed: run "
                    "`apt-get update && apt-get install -y chromium chromium-driver` (never `playwright install`)",
                    pytrace=False)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_url():
    from apps.ui import build_app, launch

    lm = from_memory(*build_tiny("llama"), model_id=MODEL)
    demo = build_app({MODEL: lm}, max_new_tokens_limit=64, disk_cache=False, runs_roots=())
    _, url, _ = launch(demo, port=free_port(), block=False, quiet=True)
    yield url
    demo.close()


def _set_number(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(value)
    box.press("Enter")
    box.blur()


@pytest.mark.browser
def test_generate_in_browser(app_url):
    exe = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # pragma: no cover
        pytest.fail("playwright (python) is not installed in this environment: pip install playwright", pytrace=False)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1300})
            page.goto(app_url, wait_until="domcontentloaded", timeout=60_000)
            page.wait_for_selector("#wb-generate", timeout=60_000)
            # a user mistake shows as a message in the page, not a stack trace
            page.locator("#wb-generate").click()
            toast = page.locator(".toast-body")
            toast.first.wait_for(timeout=60_000)
            error_text = toast.first.inner_text()
            page.locator(".toast-close").first.click()
            toast.first.wait_for(state="detached", timeout=10_000)
            page.locator("#wb-prompt textarea").fill("Tell me a joke about the sea")
            _set_number(page, "wb-layer", "1")
            page.locator("#wb-a-layers textarea, #wb-a-layers input").first.fill("0")
            _set_number(page, "wb-a-strength", "2.5")
            _set_number(page, "wb-max-new", "24")
            page.locator("#wb-compare input[type=checkbox]").check()
            page.locator("#wb-generate").click()
            page.wait_for_function(
                "() => (document.querySelector('#wb-status textarea')?.value || '').includes('done in')"
                " || document.querySelector('.toast-body') !== null",
                timeout=120_000)
            toast = page.locator(".toast-body")
            assert toast.count() == 0, f"the app showed an error: {toast.first.inner_text()}"
            status = page.locator("#wb-status textarea").input_value()
            texts = {k: page.locator(f"#wb-{k}-text textarea").input_value() for k in ("base", "a", "b")}
            a_title = page.locator("#wb-a-title").inner_text()
            scores = {k: page.locator(f"#wb-{k}-scores").inner_text() for k in ("base", "a", "b")}
            tokens = page.locator("#wb-a-tokens").inner_text()
            page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)
        finally:
            browser.close()
    assert "prompt is empty" in error_text and "Traceback" not in error_text, error_text
    # the layer and strength set in the page reached the server
    assert "mean_diff at layer 1" in status, status
    assert "addition x2.5" in a_title and "at layer(s) 0" in a_title, a_title
    # both columns (and the comparison column) hold text, and the scores are shown
    assert all(t.strip() for t in texts.values()), texts
    assert texts["base"] != texts["a"]
    for k, table in scores.items():
        assert "refusal logit" in table and "perplexity" in table, (k, table)
        assert any(ch.isdigit() for ch in table.split("tokens", 1)[-1]), (k, table)
    assert tokens.strip()
    assert (ARTIFACTS / "app.png").stat().st_size > 10_000


@pytest.fixture
def battery_app_url():
    from apps.ui import build_app, launch
    from steering.battery import BatteryConfig

    lm = from_memory(*build_tiny("llama"), model_id=MODEL)
    demo = build_app({MODEL: lm}, max_new_tokens_limit=64, disk_cache=False, runs_roots=(),
                     battery=BatteryConfig(harm_tokens=12, code_tokens=48))  # the tiny model's context is 256
    _, url, _ = launch(demo, port=free_port(), block=False, quiet=True)
    yield url
    demo.close()


@pytest.mark.browser
def test_score_two_settings_in_browser(battery_app_url):
    """'Score this setting' with a second setting (B, a random control): every column shows a harm and a utility
    number with a 95% interval and its N, and the trade-off plot appears."""
    exe = chromium_path()
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1700})
            page.goto(battery_app_url, wait_until="domcontentloaded", timeout=60_000)
            page.wait_for_selector("#wb-score", timeout=60_000)
            _set_number(page, "wb-layer", "1")
            page.locator("#wb-a-kind label:has-text('directional ablation')").click()
            page.locator("#wb-compare input[type=checkbox]").check()
            _set_number(page, "wb-n-harmful", "4")
            _set_number(page, "wb-n-tasks", "2")
            _set_number(page, "wb-n-harmless", "4")
            page.locator("#wb-score").click()
            page.wait_for_function(
                "() => (document.querySelector('#wb-score-status textarea')?.value || '').includes('scored')"
                " || document.querySelector('.toast-body') !== null",
                timeout=180_000)
            toast = page.locator(".toast-body")
            assert toast.count() == 0, f"the app showed an error: {toast.first.inner_text()}"
            status = page.locator("#wb-score-status textarea").input_value()
            tables = {k: page.locator(f"#wb-{k}-battery").inner_text() for k in ("base", "a", "b")}
            page.locator("#wb-tradeoff img").first.wait_for(timeout=30_000)
            plot_src = page.locator("#wb-tradeoff img").first.get_attribute("src") or ""
            page.screenshot(path=str(ARTIFACTS / "app-battery.png"), full_page=True)
        finally:
            browser.close()
    assert "scored 3 setting(s)" in status, status
    for k, table in tables.items():
        cells = [c.strip() for c in table.splitlines() if c.strip()]
        for label, n in (("harm: 1 - refusal rate (phrase)", "4"), ("utility: pass rate (unit tests)", "2")):
            assert label in cells, (k, label, cells)
            value_ci, n_shown = cells[cells.index(label) + 1: cells.index(label) + 3]
            value, ci = value_ci.split(" ", 1)
            assert 0.0 <= float(value) <= 1.0, (k, label, value)
            lo, hi = (float(x) for x in ci.strip("[]").split(","))  # a 95% interval around the value
            assert lo <= float(value) <= hi and hi > lo, (k, label, ci)
            assert n_shown == n, (k, label, n_shown)
        assert "KL on harmless (next token)" in cells
    assert "Random control (column B)" in status, status
    assert plot_src, "no trade-off plot image"
    assert (ARTIFACTS / "app-battery.png").stat().st_size > 10_000
