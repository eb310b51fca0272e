"""`collm serve` from the command line: the model options `collm generate` takes, limits checked before any
model loads, and a real process answering on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
from conftest import make_llama, make_tokenizer, save_tiny
from serve_live import free_port
from typer.testing import CliRunner

from collm.cli import app

runner = CliRunner()


@pytest.mark.parametrize("args, message", [
    (["--threshold", "1.5"], "threshold must be a number in [0, 1]"),
    (["--max-tokens", "0"], "max_tokens must be at least 1"),
    (["--max-concurrent", "0"], "max_concurrent must be at least 1"),
    (["--request-timeout", "0"], "request_timeout > 0"),
])
def test_serve_refuses_bad_settings_before_loading_any_model(no_model_loading, args, message):
    from collm.errors import CollmError

    result = runner.invoke(app, ["serve", *args])
    assert isinstance(result.exception, CollmError) and message in str(result.exception)


def test_serve_help_names_every_option():
    result = runner.invoke(app, ["serve", "--help"], terminal_width=200)
    for option in ("--run", "--base", "--expert", "--head", "--dtype", "--device", "--host", "--port",
                   "--max-prompt-tokens", "--max-tokens", "--max-body-bytes", "--max-concurrent", "--max-waiting",
                   "--request-timeout"):
        assert option in result.output


def test_collm_serve_process_answers_and_stops(tmp_path):
    tok = make_tokenizer()
    base = save_tiny(make_llama(0), tok, tmp_path / "base")
    expert = save_tiny(make_llama(1), tok, tmp_path / "expert")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(p) for p in sys.path if p])}
    proc = subprocess.Popen([sys.executable, "-m", "collm.cli", "serve", "--base", base, "--expert", expert,
                             "--head", "always", "--port", str(port), "--model-name", "tiny", "--max-tokens", "8"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("collm serve did not come up:\n"
                                     f"{proc.stdout.read() if proc.poll() is not None else ''}")
            time.sleep(0.2)
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] <= 8 and body["usage"]["defer_rate"] == 1.0  # head 'always'
        assert httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": 9}
                          ).status_code == 400
    finally:
        proc.terminate()
        proc.wait(timeout=30)
