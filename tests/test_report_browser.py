"""The report of a real (tiny) search, opened in headless Chromium: the page loads with no
console errors, every figure decodes and has a size, and the hover points are there.

Chromium comes from Debian (``apt-get install -y chromium``; ``.ci/run`` installs it). Where it
is missing the test skips and says so, except under CI (``CI`` set), where it fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

# Written into a copy of the page, first thing in <head>: records errors (script errors and
# resources that fail to load) and, once loaded, each image's decoded size, into the DOM.
PROBE = """<script>
window.__probeErrors = [];
window.addEventListener("error", function (e) {
  window.__probeErrors.push(String(e.message || (e.target && e.target.src) || e));
}, true);
window.addEventListener("load", function () {
  var images = Array.prototype.map.call(document.images, function (img) {
    return {w: img.naturalWidth, h: img.naturalHeight, complete: img.complete,
            data: img.src.length};
  });
  var out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({errors: window.__probeErrors, images: images,
    hover: document.querySelectorAll("svg circle > title").length});
  document.body.appendChild(out);
});
</script>"""

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
    "--virtual-time-budget=5000",
]


def _chromium() -> str:
    for name in (os.environ.get("EVOSEARCH_CHROMIUM", ""), "chromium", "chromium-browser"):
        if name and (path := shutil.which(name)):
            return path
    reason = "chromium not found (Debian: apt-get install -y chromium; .ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def _open(page, tmp_path, *extra: str) -> tuple[str, list[str]]:
    """Run Chromium on ``page``; the dumped DOM and the console lines of its log."""
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    profile.mkdir()
    proc = subprocess.run(
        [_chromium(), *FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    console = [line for line in lines if ":CONSOLE" in line or "Uncaught" in line]
    return proc.stdout, console


def _probe(html_text: str) -> str:
    return html_text.replace("<head>", "<head>" + PROBE, 1)


def test_console_errors_are_detected(tmp_path):
    """The harness itself: a page with a broken script and a broken image must be caught."""
    page = tmp_path / "broken.html"
    page.write_text(
        _probe(
            "<!DOCTYPE html><html><head></head><body><img src='data:image/png;base64,AAAA'>"
            "<script>notDefined();</script></body></html>"
        )
    )
    dom, console = _open(page, tmp_path, "--dump-dom")
    assert any("Uncaught" in line for line in console)
    probe = json.loads(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1))
    assert probe["images"][0]["w"] == 0 and probe["errors"]


def test_report_renders_in_chromium(tiny_run, tmp_path):
    page = tmp_path / "report.html"
    page.write_text(_probe((tiny_run / "report.html").read_text()))
    dom, console = _open(page, tmp_path, "--dump-dom")
    assert console == [], console
    match = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert match, "the page's load event never fired"
    probe = json.loads(match.group(1).replace("&quot;", '"'))
    assert probe["errors"] == []
    assert len(probe["images"]) == 3
    for image in probe["images"]:
        assert image["complete"] and image["w"] > 100 and image["h"] > 100, image
        assert image["data"] > 1000
    assert probe["hover"] == 4 * 2  # 4 candidates x (calibration kl, perplexity) scatters

    shot = tmp_path / "shot.png"
    _open(
        tiny_run / "report.html",
        tmp_path,
        "--hide-scrollbars",
        "--window-size=1200,1600",
        f"--screenshot={shot}",
    )
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1600, 1200)
    assert pixels.std() > 0.05  # not a blank page
