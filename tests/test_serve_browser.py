"""``metakit serve`` end to end in a real headless browser: draw three classes and a query with the mouse.

Needs Debian's Chromium and ChromeDriver and the ``selenium`` package; skipped with the install
command when any is missing (``.ci/run`` installs the browser when it runs as root)::

    apt-get install -y chromium chromium-driver
    .venv/bin/pip install -e '.[test]'      # selenium

``METAKIT_CHROMIUM`` and ``METAKIT_CHROMEDRIVER`` point at other binaries; set
``METAKIT_SERVE_SCREENSHOT=page.png`` to keep a screenshot of the page with its prediction.
"""
from __future__ import annotations

import math
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

import metakit
from metakit.config import Config
from metakit.data.transforms import OMNIGLOT_TRANSFORM
from metakit.engine.checkpoint import save
from metakit.serve import make_server

INSTALL = ("install the browser with `apt-get install -y chromium chromium-driver` and selenium with "
           "`.venv/bin/pip install -e '.[test]'`")


def _binary(env: str, name: str) -> str | None:
    path = os.environ.get(env) or shutil.which(name) or f"/usr/bin/{name}"
    return path if Path(path).is_file() and os.access(path, os.X_OK) else None


try:
    from selenium import webdriver
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    pytest.skip(f"selenium is not installed: {INSTALL}", allow_module_level=True)

CHROMIUM = _binary("METAKIT_CHROMIUM", "chromium")
CHROMEDRIVER = _binary("METAKIT_CHROMEDRIVER", "chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    missing = " and ".join(n for n, p in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if p is None)
    pytest.skip(f"{missing} not found: {INSTALL}", allow_module_level=True)


# Strokes in canvas pixels (the canvas is 280 x 280).
def _circle(cx=140, cy=140, r=85, n=28):
    return [[(round(cx + r * math.cos(2 * math.pi * i / n)), round(cy + r * math.sin(2 * math.pi * i / n)))
             for i in range(n + 1)]]


CLASSES = {
    "circle": _circle(),
    "cross": [[(140, 40), (140, 90), (140, 140), (140, 190), (140, 240)],
              [(40, 140), (90, 140), (140, 140), (190, 140), (240, 140)]],
    "zigzag": [[(50, 60), (230, 60), (50, 220), (230, 220)]],
}
QUERY = "cross"  # the last query repeats this class's drawing


def calibrated_protonet(hidden=16):
    """An untrained ProtoNet whose BatchNorm statistics are measured on sparse ink, as one training
    step's forward pass would set them: its embeddings then have unit scale, so distances (and the
    probabilities shown) are not all but equal, as they are with the initial statistics."""
    torch.manual_seed(0)
    learner = metakit.ProtoNet(metakit.ProtoNet.Options(hidden=hidden))
    for m in learner.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches seen
    with torch.no_grad():
        learner.train()
        learner.embed((torch.rand(64, 1, 28, 28) < 0.12).float())
    return learner.eval()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real ProtoNet checkpoint (untrained Conv4), loaded by path as ``metakit serve`` does."""
    learner = calibrated_protonet()
    path = save(tmp_path_factory.mktemp("ckpt") / "protonet.pt", learner,
                Config(name="browser", algorithm="protonet", model=learner.options), dict(OMNIGLOT_TRANSFORM))
    srv = make_server(path, "127.0.0.1", 0, log_requests=False)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1100,900",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)  # a path: Selenium Manager is not used
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def draw(driver, pad, strokes):
    """Press, move and release the mouse along each stroke (offsets from the canvas's centre)."""
    for stroke in strokes:
        actions = ActionChains(driver, duration=0)
        x, y = stroke[0]
        actions.move_to_element_with_offset(pad, x - 140, y - 140).click_and_hold()
        for x, y in stroke[1:]:
            actions.move_to_element_with_offset(pad, x - 140, y - 140)
        actions.release().perform()


def shown(driver) -> dict:
    """What the prediction panel shows, read in one script (the page re-renders after each stroke):
    ``state`` ("done" once the prediction for the current drawing is in), ``label``, ``probs``."""
    return driver.execute_script("""
        const p = document.getElementById('predicted'), label = document.getElementById('predicted-label');
        return {state: p.dataset.state, label: label ? label.textContent : null,
                probs: Object.fromEntries([...document.querySelectorAll('#bars li')]
                                          .map(li => [li.dataset.label, Number(li.dataset.probability)]))};""")


def test_draw_three_classes_and_a_query(server, browser):
    driver, wait = browser, WebDriverWait(browser, 15)
    driver.get(server.url)
    wait.until(lambda d: d.execute_script("return document.body.dataset.ready") == "true")
    wait.until(lambda d: "protonet" in d.find_element(By.ID, "model").text)
    pad = driver.find_element(By.ID, "pad")
    name = driver.find_element(By.ID, "class-name")

    for label, strokes in CLASSES.items():
        draw(driver, pad, strokes)
        name.send_keys(label)
        driver.find_element(By.ID, "add").click()
    items = driver.find_elements(By.CSS_SELECTOR, "#classes .class-item")
    assert [i.find_element(By.CLASS_NAME, "class-name").text for i in items] == list(CLASSES)
    for item in items:  # one thumbnail each, of a drawing (a PNG data URL)
        thumbs = item.find_elements(By.CSS_SELECTOR, ".thumbs img")
        assert len(thumbs) == 1 and thumbs[0].get_attribute("src").startswith("data:image/png;base64,")
    assert driver.execute_script("return document.getElementById('pad').toDataURL()") == \
        driver.execute_script("const c = document.createElement('canvas'); c.width = c.height = 280;"
                              "const x = c.getContext('2d'); x.fillStyle = '#fff'; x.fillRect(0, 0, 280, 280);"
                              "return c.toDataURL()")  # adding a class cleared the canvas

    for query in [q for q in CLASSES if q != QUERY] + [QUERY]:  # each class's drawing again, as the query
        driver.find_element(By.ID, "clear").click()
        assert shown(driver)["state"] == "idle"
        draw(driver, pad, CLASSES[query])  # a prediction follows each stroke's end, no button
        wait.until(lambda d: shown(d)["state"] == "done")  # the last stroke's: older answers are dropped
        result = shown(driver)
        assert result["label"] == query, result
        assert set(result["probs"]) == set(CLASSES) and math.isclose(sum(result["probs"].values()), 1, abs_tol=1e-6)
        assert max(result["probs"], key=result["probs"].get) == query
    shot = os.environ.get("METAKIT_SERVE_SCREENSHOT")
    if shot:
        driver.save_screenshot(shot)

    # Removing a class predicts again among those left; Clear empties the prediction.
    driver.find_element(By.CSS_SELECTOR, "button[aria-label='Remove class zigzag']").click()
    wait.until(lambda d: shown(d)["state"] == "done")
    result = shown(driver)
    assert set(result["probs"]) == {"circle", "cross"} and result["label"] == QUERY
    driver.find_element(By.ID, "clear").click()
    result = shown(driver)
    assert result["state"] == "idle" and not result["probs"] and result["label"] is None
    assert "Draw a character" in driver.find_element(By.ID, "predicted").text
    assert not driver.find_element(By.ID, "error").is_displayed()

    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors  # no script error, no blocked or failed request
