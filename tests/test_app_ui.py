"""The /ui page in headless Chromium against the real stack, with an API key configured.

Needs Debian's ``chromium`` package (/usr/bin/chromium) and the ``playwright`` Python
package (the dev extra); it never downloads a browser of its own.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from conftest import _FLUSH_KEEP_LOCK, LOCK_KEY, LOCK_TTL_S

from app_tasks import twist_task
from fastif_cli.stack import free_port, start_stack
from live_stack import wait_for

pytestmark = pytest.mark.integration

# The page is driven with a client key (the role that can only submit and read its own jobs);
# the model is registered with the admin key.
API_KEY = "ui-test-key-1234"
ADMIN_KEY = "ui-admin-key-5678"
CHROMIUM = os.environ.get("FASTIF_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is not installed (pip install -e '.[dev]')")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: install Debian's packages `chromium chromium-driver` "
                    "(apt-get install -y chromium chromium-driver) to run the /ui browser test")
    return sync_playwright


@pytest.fixture(scope="module")
def ui_stack(tmp_path_factory, redis_url) -> Iterator[tuple[str, dict]]:
    _playwright()
    root = tmp_path_factory.mktemp("ui-root")
    twist = twist_task(root)
    # Empty the DB but keep the session's claim on it (see conftest).
    _client = redis.Redis.from_url(redis_url, decode_responses=True)
    _client.eval(_FLUSH_KEEP_LOCK, 1, LOCK_KEY, _client.get(LOCK_KEY) or "held", LOCK_TTL_S)
    procs, url, _ = start_stack("127.0.0.1", free_port(), workers=1, log_dir=tmp_path_factory.mktemp("ui-logs"),
                                extra_env={"REDIS_URL": redis_url, "FASTIF_DATA_ROOT": str(root),
                                           "FASTIF_API_KEYS": f"ops:{ADMIN_KEY}:admin,ui:{API_KEY}:client"})
    try:
        headers = {"X-API-Key": ADMIN_KEY}
        response = httpx.post(f"{url}/v1/models", headers=headers, json={
            "name": "twist-ui", "model_path": twist["model"], "train_data": {"path": twist["train"]}})
        assert response.status_code == 202, response.text
        model = wait_for(lambda: httpx.get(f"{url}/v1/models/{response.json()['id']}", headers=headers).json(),
                         lambda m: m["status"] != "building", timeout_s=180)
        assert model["status"] == "ready", model
        yield url, model
    finally:
        procs.stop(grace_s=10)


def test_ui_page_is_public_and_locked_down(ui_stack):
    url, _ = ui_stack
    response = httpx.get(f"{url}/ui")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert httpx.get(f"{url}/v1/models").status_code == 401  # the API behind it is not


def test_ui_explains_an_input_with_a_pasted_key(ui_stack, tmp_path):
    url, model = ui_stack
    sync_playwright = _playwright()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(f"{url}/ui")
            # Without the key the page says why it cannot list the models.
            # (Waits use selectors: the page's CSP forbids the eval behind wait_for_function.)
            page.wait_for_selector("#status.error:has-text('401')", timeout=20_000)
            page.fill("#api-key", API_KEY)
            page.click("#load-models")
            page.wait_for_selector(f"#model option[value='{model['id']}']", state="attached", timeout=20_000)
            page.select_option("#model", model["id"])
            page.fill("#text", "a great and lovely film")
            page.click("summary")
            page.fill("#k", "60")
            page.fill("#top", "5")
            page.fill("#depth", "100")
            page.fill("#scale", "100")
            page.fill("#damp", "0.01")
            page.click("#explain-btn")
            page.wait_for_selector("#helpful li.example", timeout=180_000)
            assert page.text_content("#predicted-label") == "positive"
            helpful = page.query_selector_all("#helpful li.example")
            assert 1 <= len(helpful) <= 5
            widths = [item.eval_on_selector(".bar", "b => b.getBoundingClientRect().width") for item in helpful]
            assert widths[0] > 0 and widths == sorted(widths, reverse=True)  # score bars, biggest first
            assert "helpful examples carry the predicted label" in page.text_content("#agreement")
            page.wait_for_selector("#graph-box:not(.hidden) #graph-img[src^='blob:']", timeout=180_000)
            image = page.locator("#graph-img")
            assert wait_for(lambda: image.evaluate("img => img.complete ? img.naturalWidth : 0"), lambda w: w > 0,
                            timeout_s=20) >= 600
            assert "Done" in page.text_content("#status")
            page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)
        finally:
            browser.close()
