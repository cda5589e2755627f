"""The interactive NiiVue page: self-contained, and drawn by a real browser (headless Chromium).

The browser is driven over the Chrome DevTools Protocol through a pipe (``--remote-debugging-pipe``),
so the test sees every request the page makes (``Network.requestWillBeSent``), waits until
the page says it has drawn the subject, and takes a real screenshot; the pixel statistics
of that screenshot show the grey scan, the red-yellow overlay and the cyan outline.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from uadct.errors import InputError
from uadct.viewer import match_subjects, niivue_bundle, niivue_licence, write_viewer

WIDTH, HEIGHT = 1000, 640
SIDE_PANEL = 280  # px: the page's left column; the canvas fills the rest
COLOURBAR_ROWS = 70  # px at the bottom of the canvas holding the colour bar, left out of the overlay counts


def find_chromium() -> str | None:
    """A Chromium-family browser: $UADCT_CHROMIUM, else chromium / chromium-browser / google-chrome on PATH."""
    for candidate in (os.environ.get("UADCT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


class DevToolsBrowser:
    """Headless Chromium driven over the DevTools protocol on fds 3/4 (no websocket, no extra package)."""

    def __init__(self, executable: str, profile: Path) -> None:
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()

        def wire_pipes() -> None:  # in the child: the protocol pipes become fds 3 (commands) and 4 (replies)
            os.dup2(to_browser_read, 3)
            os.dup2(from_browser_write, 4)

        flags = ["--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu-sandbox",
                 "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--no-first-run", "--no-default-browser-check",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--disable-extensions", f"--user-data-dir={profile}",
                 f"--window-size={WIDTH},{HEIGHT}", "about:blank"]
        self.process = subprocess.Popen([executable, *flags], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, close_fds=False, preexec_fn=wire_pipes)
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        self.session: str | None = None

    def send(self, method: str, params: dict | None = None, session: bool = True, timeout: float = 120.0) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def _read(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._from_browser], [], [], remaining)[0]:
                raise TimeoutError("no reply from the browser")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("the browser closed the protocol pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str) -> None:
        """A new page, attached, with the network and page domains on, navigated to ``url``."""
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)["sessionId"]
        self.send("Network.enable")
        self.send("Page.enable")
        self.send("Emulation.setDeviceMetricsOverride", {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False})
        self.send("Page.navigate", {"url": url})

    def evaluate(self, expression: str) -> object:
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True, "returnByValue": True})
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 300.0) -> object:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.25)
        raise TimeoutError(f"{expression} stayed false for {timeout} s")

    def screenshot(self) -> np.ndarray:
        """The viewport as an ``(H, W, 3)`` uint8 array, after two more animation frames."""
        self.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(true))))")
        data = base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])
        from matplotlib.image import imread

        return (imread(io.BytesIO(data), format="png")[..., :3] * 255).round().astype(np.uint8)

    def requested_urls(self) -> list[str]:
        return [event["params"]["request"]["url"] for event in self.events if event.get("method") == "Network.requestWillBeSent"]

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False, timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


@pytest.fixture(scope="module")
def chromium() -> str:
    executable = find_chromium()
    if executable is None:
        reason = "chromium not found (apt-get install chromium; .ci/run installs it): the browser test cannot run"
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)
    return executable


def _write(array: np.ndarray, reference: sitk.Image, path: Path) -> Path:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def cohort(small_atlas_path, tmp_path_factory) -> Path:
    """Two subjects on the 2 mm SRI24 brain: a map that is a bright blob over a low floor, its lesion label."""
    root = tmp_path_factory.mktemp("viewer")
    template = sitk.ReadImage(str(small_atlas_path))
    scan = sitk.GetArrayFromImage(template).astype(np.float32)
    z, y, x = np.indices(scan.shape)
    centre = np.array(scan.shape) // 2 + np.array([4, -10, 12])
    radius = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
    noise = np.random.default_rng(0).random(scan.shape)
    anomaly_map = np.where(scan > 0, 0.05 + 0.02 * noise + np.exp(-((radius / 7.0) ** 2)), 0.0).astype(np.float32)
    for folder in ("scans", "maps", "labels"):
        (root / folder).mkdir()
    for name in ("sub-01", "sub-02"):
        _write(scan, template, root / "scans" / f"{name}.nii.gz")
        _write(anomaly_map, template, root / "maps" / f"{name}.nii.gz")
        _write((radius < 8).astype(np.uint8), template, root / "labels" / f"{name}.nii.gz")
    (root / "maps" / "sub-99.nii.gz").write_bytes(b"a map without a scan")
    return root


def test_page_is_one_file_with_the_bundle_the_licence_and_the_volumes(cohort, tmp_path):
    subjects, failed = match_subjects(cohort / "scans", cohort / "maps", cohort / "labels")
    result = write_viewer(subjects, tmp_path / "view.html", failed=failed)
    page = result.path.read_text(encoding="utf-8")
    assert result.subjects == ["sub-01", "sub-02"] and [name for name, _ in result.failed] == ["sub-99"]
    assert "sub-99" in page and "Not drawn" in page
    # nothing is fetched: no external script, stylesheet, image or frame; a CSP forbids connections
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", page)
    assert "default-src 'none'" in page and "connect-src data: blob:" in page
    assert niivue_bundle()[:2000] in page and "BSD 2-Clause License" in niivue_licence()
    data = json.loads(re.search(r'<script type="application/json" id="uadct-data">(.*?)</script>', page, re.S).group(1))
    first = data["subjects"][0]
    for key in ("scan", "map", "label"):
        assert base64.b64decode(first[key])[:2] == b"\x1f\x8b"  # gzipped NIfTI
    # the map is embedded as it is: same values on the same grid
    embedded = tmp_path / "embedded.nii.gz"
    embedded.write_bytes(base64.b64decode(first["map"]))
    original = sitk.ReadImage(str(cohort / "maps" / "sub-01.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(embedded))), sitk.GetArrayFromImage(original))
    values = sitk.GetArrayFromImage(original)
    assert first["threshold"] == pytest.approx(np.percentile(values[values != 0], 95))
    assert result.path.stat().st_size < 6_000_000


def test_bad_subjects_are_listed_and_no_page_is_written_without_any(cohort, tmp_path):
    from typer.testing import CliRunner

    from uadct.cli import app

    runner = CliRunner()
    page = tmp_path / "page.html"
    done = runner.invoke(app, ["heatmap", "--html", "--interactive", str(cohort / "scans"), str(cohort / "maps"),
                               "-o", str(page), "--label", str(cohort / "labels")])
    assert done.exit_code == 1  # sub-99 has no scan: listed, and the command says so
    assert page.is_file() and "sub-99" in done.output
    single = runner.invoke(app, ["heatmap", "--interactive", str(cohort / "scans" / "sub-01.nii.gz"),
                                 str(cohort / "maps" / "sub-01.nii.gz"), "-o", str(tmp_path / "one.html")])
    assert single.exit_code == 0, single.output
    with pytest.raises(InputError, match="no subject could be drawn"):
        write_viewer(match_subjects(cohort / "scans", cohort / "maps")[0][:0], tmp_path / "none.html")
    assert not (tmp_path / "none.html").exists()


def _colour_counts(pixels: np.ndarray) -> dict[str, int]:
    """Pixels of the views (the canvas less its colour-bar strip) by colour class."""
    views = pixels[: HEIGHT - COLOURBAR_ROWS, SIDE_PANEL:].astype(int)
    red, green, blue = views[..., 0], views[..., 1], views[..., 2]
    grey = (np.abs(red - green) <= 6) & (np.abs(green - blue) <= 6) & (red >= 30) & (red <= 235)
    overlay = (red >= 200) & (blue <= 90) & (green >= 60)  # NiiVue "warm": orange -> yellow
    outline = (red <= 90) & (green >= 170) & (blue >= 200)  # cyan
    return {"grey": int(grey.sum()), "overlay": int(overlay.sum()), "outline": int(outline.sum()), "total": int(grey.size)}


@pytest.mark.slow
def test_headless_chromium_draws_scan_overlay_and_outline_without_network(chromium, cohort, tmp_path):
    subjects, failed = match_subjects(cohort / "scans", cohort / "maps", cohort / "labels")
    page = write_viewer(subjects, tmp_path / "view.html", failed=failed).path
    browser = DevToolsBrowser(chromium, tmp_path / "profile")
    try:
        started = time.monotonic()
        browser.open(page.as_uri())
        state = browser.wait_for("['drawn', 'error'].includes(document.body.dataset.state) && document.body.dataset.state")
        assert state == "drawn", browser.evaluate("document.getElementById('status').textContent")
        drawn_after = time.monotonic() - started
        location = browser.evaluate("document.getElementById('location').textContent")
        shown = browser.screenshot()
        from matplotlib.image import imsave

        imsave(tmp_path / "viewer.png", shown)
        first = _colour_counts(shown)
        # the slider: a threshold above the map's maximum leaves no overlay; the outline switch hides the outline
        browser.evaluate("(() => { const t = document.getElementById('threshold'); t.value = t.max;"
                         " t.dispatchEvent(new Event('input')); const o = document.getElementById('outline');"
                         " o.checked = false; o.dispatchEvent(new Event('change')); return true; })()")
        hidden_pixels = browser.screenshot()
        imsave(tmp_path / "viewer_hidden.png", hidden_pixels)
        hidden = _colour_counts(hidden_pixels)
        # the subject list: another subject loads in the same page
        browser.evaluate("document.querySelectorAll('#subjects button')[1].click() || true")
        switched = browser.wait_for("document.getElementById('status').textContent === 'sub-02 drawn'"
                                    " && document.body.dataset.state === 'drawn'")
        urls = browser.requested_urls()
    finally:
        browser.close()
    assert switched
    shown_urls = [url[:40] + ("..." if len(url) > 40 else "") for url in urls]
    print(f"drawn after {drawn_after:.1f} s, done after {time.monotonic() - started:.1f} s;")
    print(f"screenshot {tmp_path / 'viewer.png'}; drawn: {first}; threshold at max, outline off: {hidden}; requests: {shown_urls}")
    assert first["grey"] > 0.05 * first["total"]  # the scan: grey anatomy over a good part of the views
    assert first["overlay"] > 1000  # the blob in red-yellow, in several views
    assert first["outline"] > 50  # the cyan lesion outline
    assert hidden["overlay"] < 0.02 * first["overlay"] and hidden["outline"] < 0.1 * first["outline"]
    assert hidden["grey"] > 0.9 * first["grey"]  # the scan is still there
    # the crosshair starts on the map's maximum, and NiiVue reads the map's own value there
    peak = float(sitk.GetArrayFromImage(sitk.ReadImage(str(cohort / "maps" / "sub-01.nii.gz"))).max())
    assert float(re.search(r"map (\S+)$", location).group(1)) == pytest.approx(peak, rel=1e-3), location
    network = [url for url in urls if not url.startswith(("file:", "data:", "blob:", "about:"))]
    assert network == [], network
    assert any(url.startswith("file:") for url in urls)  # the page itself was seen: requests are recorded


def test_the_request_recorder_sees_a_page_that_does_reach_out(chromium, tmp_path):
    """Control for the test above: a page that loads an image over http is caught."""
    page = tmp_path / "leaky.html"
    page.write_text('<!DOCTYPE html><html><body data-state="drawn"><img src="http://127.0.0.1:9/probe.png"></body></html>')
    browser = DevToolsBrowser(chromium, tmp_path / "profile")
    try:
        browser.open(page.as_uri())
        browser.wait_for("document.readyState === 'complete'", timeout=60)
        urls = browser.requested_urls()
    finally:
        browser.close()
    assert "http://127.0.0.1:9/probe.png" in urls
