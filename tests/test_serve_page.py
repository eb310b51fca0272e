"""The playground page in headless Chromium (Debian's package), driven over the DevTools protocol: load it,
type a prompt, move the threshold slider, press Generate, and check the streamed tokens, colored by writer."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from serve_live import live, tiny_pair
from websockets.sync.client import connect

from collm.serve.app import build_app
from collm.serve.serving import ServeConfig

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")


class Page:
    """One tab over the Chrome DevTools protocol: evaluate JavaScript, take screenshots."""

    def __init__(self, ws_url: str):
        self.ws = connect(ws_url, max_size=None, open_timeout=30)
        self.ids = 0

    def call(self, method: str, **params) -> dict:
        self.ids += 1
        self.ws.send(json.dumps({"id": self.ids, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=60))
            if reply.get("id") == self.ids:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while not (value := self.js(expression)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never satisfied {expression}")
            time.sleep(0.1)
        return value


@contextlib.contextmanager
def chromium_page(profile: Path):
    """A headless Chromium with one blank tab, as a :class:`Page`; the browser is ended after."""
    proc = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-dev-shm-usage", "--remote-debugging-address=127.0.0.1",
                             "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1000,700",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("chromium did not start")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list").json()
        page = Page(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"])
        yield page
        page.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def browser(tmp_path):
    with chromium_page(tmp_path / "profile") as page:
        yield page


def test_playground_streams_tokens_colored_by_writer(browser, tmp_path):
    pair = tiny_pair()
    want = pair.generate(["Tell me a story"], max_new_tokens=40, threshold=0.5)
    assert 0 < sum(want.sources[0]) < len(want.sources[0])
    with live(build_app(pair, ServeConfig(model_name="tiny"))) as url:
        browser.call("Page.enable")
        browser.call("Page.navigate", url=f"{url}/")
        # the legend starts as "expert 1" and gets the experts' names from /v1/models: wait for them
        browser.wait_for("document.readyState === 'complete' && document.querySelectorAll('#legend span').length === 2"
                         " && document.querySelector('#legend .src-1').textContent.includes(':')")
        assert browser.js("document.querySelector('#legend .src-1').textContent") == "expert 1: tiny-1"
        browser.js("""(() => {
            const set = (id, value) => { const el = document.getElementById(id); el.value = value;
                                         el.dispatchEvent(new Event('input', {bubbles: true})); };
            set('prompt', 'Tell me a story'); set('threshold', '0.5'); set('max-tokens', '40');
            document.getElementById('go').click();
        })()""")
        browser.wait_for("document.body.dataset.state === 'done'")
        assert browser.js("document.getElementById('error').textContent") == ""
        tokens = browser.js("""[...document.querySelectorAll('#output .tok')].map(s => ({
            text: s.textContent, source: Number(s.dataset.source), title: s.title,
            color: getComputedStyle(s).backgroundColor}))""")
        shot = browser.call("Page.captureScreenshot", format="png")["data"]
    out = Path(os.environ.get("COLLM_SCREENSHOT_DIR", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    (out / "playground.png").write_bytes(__import__("base64").b64decode(shot))

    assert "".join(t["text"] for t in tokens) == want.texts[0]
    assert [t["source"] for t in tokens] == want.sources[0]
    base_colors = {t["color"] for t in tokens if t["source"] == 0}
    expert_colors = {t["color"] for t in tokens if t["source"] == 1}
    assert len(base_colors) == len(expert_colors) == 1 and base_colors != expert_colors
    assert all("P(defer) = " in t["title"] for t in tokens)
    first = tokens[0]
    assert f"{want.defer_probs[0][0]:.3f}" in first["title"]
    assert browser.js("document.getElementById('threshold-value').textContent") == "0.50"
    assert "deferral rate" in browser.js("document.getElementById('summary').textContent")
