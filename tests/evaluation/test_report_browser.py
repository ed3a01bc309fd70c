"""report.html opens in a real browser (Debian's headless Chromium) with no console errors and
every picture decoded; a screenshot is taken. The test installs Chromium and its driver with apt
when they are missing (CI runs as root), and skips only where that is impossible."""

from __future__ import annotations

import pytest

from tests.browser import chromium


@pytest.mark.slow
def test_report_opens_in_chromium_without_errors_and_all_pictures(clothing_run, tmp_path):
    driver = chromium(tmp_path / "profile")
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
