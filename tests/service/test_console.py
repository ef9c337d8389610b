"""The web console (/console) and the self-hosted API docs: served from package files, nothing from a CDN.

The browser test drives a real headless Chromium (Debian's `chromium` + `chromium-driver`, and selenium)
against a live server through enroll -> identify -> verify -> delete; it is skipped when either is missing.
Set IDEMBED_CONSOLE_SCREENSHOT=docs/images/console.png to save the screenshot the docs show.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from testkit.service_helpers import API_KEY, LiveServer, TinyBundle, start_server


@pytest.mark.asyncio
async def test_console_and_docs_are_served_from_local_files(client: httpx.AsyncClient) -> None:
    page = await client.get("/console", follow_redirects=True)
    assert page.status_code == 200 and "idembed console" in page.text
    for asset, kind in (("/console/console.js", "javascript"), ("/console/console.css", "css")):
        r = await client.get(asset)
        assert r.status_code == 200 and kind in r.headers["content-type"], asset
    for path in ("/docs", "/redoc"):
        html = (await client.get(path)).text
        assert "/docs-assets/" in html
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
        assert urls and all(u.startswith("/") for u in urls), urls  # nothing from another host
        for url in urls:
            if url.startswith("/docs-assets/"):
                assert (await client.get(url)).status_code == 200, url
    console = (await client.get("/console/")).text + (await client.get("/console/console.js")).text
    assert "http://" not in console and "https://" not in console
    assert ".innerHTML" not in (await client.get("/console/console.js")).text  # user data as text, not HTML


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="idembed-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1280,1500",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def console_server(tiny: TinyBundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("console")
    env = {
        "IDEMBED_BUNDLE_PATH": str(tiny.path),
        "IDEMBED_STORE_URL": f"sqlite:///{tmp / 'console.sqlite3'}",
        "IDEMBED_API_KEYS": API_KEY,  # reads need the key too: the service's default
    }
    live = start_server(env, tmp / "server.log")
    yield live
    live.stop()


@pytest.mark.slow
def test_enroll_identify_verify_delete_in_a_real_browser(
    browser, console_server: LiveServer, tiny: TinyBundle, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    idx = tiny.of_digit(8, 3)
    files = []
    for k, i in enumerate(idx):
        path = tmp_path / f"8_{k}.png"
        path.write_bytes(tiny.png(i))
        files.append(str(path))
    wait = WebDriverWait(browser, 20)
    find = browser.find_element

    browser.get(f"{console_server.url}/console")
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "401"))  # no key yet: refused, and says so
    find(By.ID, "api-key").send_keys(API_KEY)
    find(By.CSS_SELECTOR, "#key-form button").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "model-id"), "tiny-digits:1"))
    assert "calibrated for a false-accept rate" in find(By.ID, "calibration").text

    find(By.ID, "enroll-name").send_keys("eight")
    find(By.ID, "enroll-images").send_keys("\n".join(files[:2]))
    find(By.ID, "enroll-metadata").send_keys('{"source": "browser test"}')
    find(By.CSS_SELECTOR, "#enroll-form button").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#identity-rows tr[data-name='eight']")))
    assert "enrolled eight from 2 image(s)" in find(By.ID, "status").text
    assert "(1 enrolled)" in find(By.ID, "identity-total").text

    find(By.ID, "identify-image").send_keys(files[2])
    find(By.ID, "identify-k").clear()
    find(By.ID, "identify-k").send_keys("5")
    find(By.CSS_SELECTOR, "#identify-form button").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#identify-matches tr")))
    matches = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#identify-matches tr")]
    assert any(" eight " in f" {m} " and m.endswith("enrolled") for m in matches), matches
    assert find(By.ID, "identify-answer").text

    find(By.ID, "verify-a").send_keys(files[0])
    find(By.ID, "verify-b").send_keys(files[1])
    find(By.CSS_SELECTOR, "#verify-form button").click()
    wait.until(ec.presence_of_element_located((By.ID, "verify-similarity")))
    assert -1.0 <= float(find(By.ID, "verify-similarity").text) <= 1.0
    assert find(By.CSS_SELECTOR, "#verify-result .decision").text in ("same identity", "different identities")

    shot = os.environ.get("IDEMBED_CONSOLE_SCREENSHOT")
    if shot:
        browser.save_screenshot(shot)

    find(By.CSS_SELECTOR, "#identity-rows tr[data-name='eight'] button.danger").click()
    browser.switch_to.alert.accept()
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "deleted eight"))
    wait.until(ec.invisibility_of_element_located((By.CSS_SELECTOR, "#identity-rows tr[data-name='eight']")))
    r = httpx.get(f"{console_server.url}/v1/identities/eight", headers={"X-API-Key": API_KEY}, timeout=10)
    assert r.status_code == 404
