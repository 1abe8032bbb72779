"""index.html in a real browser (headless Chromium): it renders (a screenshot that is
not blank), every gallery image decodes, and the page asks the network for nothing.

Skipped only where Chromium is not installed; with CI=true a missing Chromium fails
(.ci/run installs Debian's `chromium`). The page has no script: to read the images'
decoded sizes the test loads a copy with a small script appended.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = Array.from(document.images);
  const out = {images: imgs.length,
               decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
               resources: performance.getEntriesByType("resource").map(e => e.name)};
  const pre = document.createElement("pre");
  pre.id = "lra-probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


@pytest.fixture(scope="module")
def browser() -> str:
    found = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if found is None:
        message = ("Chromium is not installed (Debian: apt-get install chromium); "
                   "the browser test of data/report/index.html needs it")
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {message}")
        pytest.skip(message)
    return found


def chromium(browser: str, tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with a fresh profile and no name resolution: nothing the page
    asked for could leave the machine, and the net log records what it asked for."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu",
           "--disable-dev-shm-usage", "--hide-scrollbars", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND", *args, url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def page_requests(netlog: Path) -> list[str]:
    """URLs of the network requests a page made (Chromium's own background requests,
    which have no initiating origin, are left out)."""
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    starts = [e.get("params", {}) for e in log["events"] if e["type"] == start]
    return [p["url"] for p in starts
            if "url" in p and p.get("initiator") != "not an origin"]


def test_net_log_sees_a_page_request(browser, tmp_path):
    """The detector works: a page with a remote image and stylesheet is caught."""
    page = tmp_path / "control.html"
    page.write_text('<!DOCTYPE html><img src="http://example.invalid/x.png">'
                    '<link rel="stylesheet" href="https://cdn.example.invalid/a.css">')
    chromium(browser, tmp_path, page.as_uri(), f"--log-net-log={tmp_path / 'control.json'}",
             "--dump-dom")
    assert sorted(page_requests(tmp_path / "control.json")) == [
        "http://example.invalid/x.png", "https://cdn.example.invalid/a.css"]


def test_report_renders_offline_with_every_image_decoded(browser, pipeline_run, tmp_path):
    source = pipeline_run.path("report_html")
    page = tmp_path / "index.html"
    shutil.copy2(source, page)
    text = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", text, re.I)

    # 1. the page itself: a screenshot, and the requests it made
    shot = tmp_path / "screenshot.png"
    netlog = tmp_path / "netlog.json"
    chromium(browser, tmp_path, page.as_uri(), "--window-size=1280,3000",
             f"--screenshot={shot}", f"--log-net-log={netlog}")
    assert page_requests(netlog) == []
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (3000, 1280)
    assert pixels.std() > 10 and len(np.unique(pixels)) > 50, "the screenshot is blank"
    # the gallery's digits (white on black) are below the charts: dark pixels down there
    assert (pixels[1500:] < 40).mean() > 0.005

    # 2. a copy with a probe script: every <img> decoded, no resource was fetched
    probed = tmp_path / "probed.html"
    probed.write_text(text.replace("</body>", PROBE + "</body>"))
    dom = chromium(browser, tmp_path, probed.as_uri(), "--virtual-time-budget=10000",
                   "--dump-dom").stdout
    found = re.search(r'<pre id="lra-probe">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    probe = json.loads(html.unescape(found.group(1)))
    items = pipeline_run.params["report"]["gallery_items"]
    k = pipeline_run.params["report"]["gallery_neighbours"]
    assert probe["images"] == items * (1 + k)
    assert probe["decoded"] == probe["images"]
    assert probe["resources"] == []
