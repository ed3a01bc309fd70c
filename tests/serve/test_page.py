"""The web page in a real browser (Debian's headless Chromium through selenium): paste a key,
create a model, add photos to each category, train, watch, read the result and try a photo, with
no console error. A screenshot of the end is kept in tests/artifacts/ (not committed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.browser import chromium
from tests.serve.test_flow import CLASSES

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"


@pytest.mark.slow
def test_the_whole_flow_from_the_web_page(service, clothing, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium(tmp_path / "profile")
    wait = WebDriverWait(driver, 300)
    try:
        driver.get(service.url + "/")
        driver.find_element(By.ID, "key").send_keys(service.admin)
        driver.find_element(By.ID, "save-key").click()
        driver.find_element(By.ID, "new-name").send_keys("from the page")
        driver.find_element(By.ID, "new-categories").send_keys(", ".join(CLASSES))
        driver.find_element(By.ID, "create").click()
        wait.until(ready.text_to_be_present_in_element((By.ID, "model-title"), "from the page"))
        assert "needs 10 photos" in driver.find_element(By.ID, "train-why").text
        assert not driver.find_element(By.ID, "train").is_enabled()
        for label in CLASSES:
            photos = sorted((clothing / "train" / label).glob("*.jpg"))[50:62]
            bad = tmp_path / f"{label}-notes.jpg"
            bad.write_text("<html>moved</html>")
            box = f"[data-category='{label}']"
            driver.find_element(By.CSS_SELECTOR, f"{box} input[type=file]").send_keys(
                "\n".join(str(p) for p in [*photos, bad])
            )
            wait.until(ready.text_to_be_present_in_element((By.CSS_SELECTOR, f"{box} .count"), "12 photos"))
            assert "notes.jpg: not an image" in driver.find_element(By.CSS_SELECTOR, f"{box} .rejected").text
        wait.until(lambda d: d.find_element(By.ID, "train").is_enabled())
        driver.find_element(By.ID, "train").click()
        wait.until(ready.visibility_of_element_located((By.ID, "job")))
        wait.until(ready.text_to_be_present_in_element((By.ID, "summary"), "test accuracy"))
        assert "succeeded" in driver.find_element(By.ID, "job-line").text
        assert len(driver.find_elements(By.CSS_SELECTOR, "#per-class tr")) == 1 + len(CLASSES)
        assert "of them right" in driver.find_element(By.ID, "threshold-line").text
        photo = sorted((clothing / "test" / "pants").glob("*.jpg"))[0]
        driver.find_element(By.ID, "try-file").send_keys(str(photo))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#try-result .bar"))
        assert driver.find_element(By.ID, "try-label").text
        assert "serving" in driver.find_element(By.ID, "versions").text
        assert "/predict" in driver.find_element(By.ID, "snippet").text
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        ARTIFACTS.mkdir(exist_ok=True)
        driver.set_window_size(1200, min(driver.execute_script("return document.body.scrollHeight"), 6000))
        driver.save_screenshot(str(ARTIFACTS / "service-page.png"))
    finally:
        driver.quit()
    assert not errors, errors
    assert (ARTIFACTS / "service-page.png").stat().st_size > 20_000
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
