"""The MLflow UI as a researcher sees it: a smoke study, ``mlflow ui`` on 127.0.0.1, and a real headless Chromium
(Debian's ``chromium`` and ``chromium-driver``, driven by Selenium).

CI's browser stage (``pytest -m browser``) installs the browser. Screenshots of each page land in the test's
temporary folder, for a person to look at.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import mlflow_runs, run_cli

from study.orchestration.ray_address import free_port

pytestmark = pytest.mark.browser
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    assert not missing, f"{missing} missing: apt-get install chromium chromium-driver (CI's browser stage does)"
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    # Headless as root, and no calls out of this machine (background networking would be refused, many times).
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1600,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


@pytest.fixture
def mlflow_ui(tmp_path):
    """``mlflow ui`` on the study's store in ``tmp_path``, bound to 127.0.0.1; yields its address."""
    port = free_port()
    log = open(tmp_path / "mlflow_ui.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                             f"sqlite:///{tmp_path / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if urllib.request.urlopen(f"{address}/health", timeout=2).status == 200:
                break
        except OSError:
            pass
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "mlflow_ui.log").read_text()[-2000:]
        time.sleep(0.5)
    yield address
    os.killpg(proc.pid, 15)
    proc.wait(30)
    log.close()


def wait_for(driver, what: str, find, timeout: float = 60):
    """``find(driver)`` once it returns something truthy; fails naming ``what`` and saving a screenshot."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, ignored_exceptions=(WebDriverException,)).until(find)
    except Exception as exc:  # the timeout, with the page as it was
        driver.save_screenshot("/tmp/mlflow-ui-failure.png")
        raise AssertionError(f"{what}: not shown after {timeout:.0f}s at {driver.current_url} "
                             f"(screenshot /tmp/mlflow-ui-failure.png)") from exc


def run_name_cells(driver) -> dict[str, object]:
    """Run name -> its link element, for every row the runs table shows."""
    from selenium.webdriver.common.by import By

    links = driver.find_elements(By.CSS_SELECTOR, "div[role=gridcell][col-id*='Run Name'] a")
    return {a.text.strip(): a for a in links if a.text.strip()}


def test_the_mlflow_ui_opens_on_runs_nests_trials_and_renders_the_report(tmp_path, smoke_cache, mlflow_ui,
                                                                         browser):
    from selenium.webdriver.common.by import By

    proc = run_cli(["--smoke-test", "--set", "params.epochs=1"], tmp_path, smoke_cache)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    c, runs = mlflow_runs(tmp_path)
    parent = next(r for r in runs if r.data.tags["study.kind"] == "sweep")
    children = sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    assert len(children) == 3  # two trials and the baseline

    # The experiment opens on its runs, from the link the summary prints.
    link = re.search(r"then open (http://127\.0\.0\.1:5000/\S+)", proc.stdout).group(1)
    browser.get(link.replace("http://127.0.0.1:5000", mlflow_ui))
    rows = wait_for(browser, "the parent run's row", lambda d: parent.info.run_name in run_name_cells(d) and
                    run_name_cells(d))
    assert "/runs" in browser.current_url and "workflowType=machine_learning" in browser.current_url
    assert not browser.find_elements(By.XPATH, "//*[text()='Traces']/following::*[text()='No data available']")
    assert set(rows) == {parent.info.run_name}  # the children are folded under their parent
    browser.save_screenshot(str(tmp_path / "1-runs.png"))

    # Unfolded, the parent shows its trials and its baseline, indented beneath it.
    cell = rows[parent.info.run_name].find_element(By.XPATH, "./ancestor::div[@role='gridcell']")
    cell.find_element(By.CSS_SELECTOR, "button").click()
    rows = wait_for(browser, "the parent's children", lambda d: len(run_name_cells(d)) == 4 and run_name_cells(d))
    assert set(rows) == {parent.info.run_name, *children}
    x_parent = rows[parent.info.run_name].location["x"]
    assert all(rows[name].location["x"] > x_parent for name in children), {n: e.location for n, e in rows.items()}
    browser.save_screenshot(str(tmp_path / "2-nested.png"))

    # The parent's HTML report renders in MLflow's artifact viewer, its figures included.
    browser.get(f"{mlflow_ui}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}/artifacts/"
                "analysis/report.html?workflowType=machine_learning")
    frame = wait_for(browser, "the report's frame", lambda d: d.find_elements(By.TAG_NAME, "iframe"))[0]
    browser.switch_to.frame(frame)
    images = wait_for(browser, "the report's figures", lambda d: [
        i for i in d.find_elements(By.TAG_NAME, "img") if d.execute_script("return arguments[0].naturalWidth", i)])
    assert len(images) >= 4  # trade-off map, accuracy vs intensity, marginals, WiSE-FT curves
    assert "Finding: clip-alignment-study" in browser.find_element(By.TAG_NAME, "body").text
    assert browser.find_elements(By.TAG_NAME, "table")
    browser.switch_to.default_content()
    browser.save_screenshot(str(tmp_path / "3-report.png"))
    print(f"screenshots: {sorted(str(p) for p in tmp_path.glob('*.png'))}")
