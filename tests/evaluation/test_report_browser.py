"""report.html opens in a real browser (Debian's headless Chromium) with no console errors and
every picture decoded; a screenshot is taken. The test installs Chromium and its driver with apt
when they are missing (CI runs as root), and skips only where that is impossible."""

from __future__ import annotations

import shutil
import subprocess

import pytest

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _ensure_browser() -> None:
    if shutil.which("chromium") and shutil.which("chromedriver"):
        return
    if shutil.which("apt-get") is None:
        pytest.skip("Chromium is not installed and apt-get is not available to install it")
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium", "chromium-driver"],
    ):
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        if done.returncode != 0:
            pytest.skip(f"could not install Chromium ({' '.join(command)}): {done.stderr[-500:]}")


@pytest.mark.slow
def test_report_opens_in_chromium_without_errors_and_all_pictures(clothing_run, tmp_path):
    _ensure_browser()
    selenium = pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert selenium
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,2400",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        driver.get((clothing_run / "report.html").resolve().as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);"
        )
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1200, min(height, 8000))
        screenshot = tmp_path / "report.png"
        driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    assert not errors, errors
    named = {alt for alt, _, _ in images}
    assert {"training curves", "confusion matrix", "reliability diagram"} <= named
    broken = [alt for alt, complete, width in images if not complete or width == 0]
    assert not broken, f"pictures that did not load: {broken}"
    assert screenshot.stat().st_size > 20_000
    gallery = [alt for alt, _, _ in images if alt.endswith(".jpg")]
    assert len(gallery) >= 10  # thumbnails of real misclassified photos
