"""First use collaborates: with no model options `collm generate`, `collm serve` and `CoLLM.from_pretrained()`
load the shipped SmolLM2 run (tuned base, math expert, trained head and threshold), and on a shipped problem the
expert writes some of the answer, with no warning a user cannot act on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
from serve_live import free_port

from collm.run import SHIPPED, resolve_run

PROBLEMS = json.loads((SHIPPED["smollm2"] / "problems.json").read_text())["problems"]
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONWARNINGS": "default"}


def _no_warnings(stderr: str) -> None:
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if "warn" in line.lower()]
    assert lines == []


def test_a_shipped_run_may_be_named_where_a_folder_is_asked_for(tmp_path, monkeypatch):
    assert resolve_run("smollm2") == SHIPPED["smollm2"] and resolve_run("qwen") == SHIPPED["qwen"]
    (tmp_path / "smollm2").mkdir()
    monkeypatch.chdir(tmp_path)  # a folder of that name wins over the shipped run
    assert str(resolve_run("smollm2")) == "smollm2"


def test_the_python_api_default_collaborates():
    from collm import CoLLM

    pair = CoLLM.from_pretrained()
    assert pair.threshold == json.loads((SHIPPED["smollm2"] / "collm.json").read_text())["threshold"]
    out = pair.generate(PROBLEMS[0]["prompt"], max_new_tokens=48)
    assert 0 < sum(1 for s in out.sources[0] if s) < len(out.sources[0])


def test_generate_with_no_flags_shows_expert_tokens():
    run = subprocess.run([sys.executable, "-m", "collm", "generate", "--json", "--max-new-tokens", "40",
                          PROBLEMS[1]["prompt"]], capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["stats"]["deferred_tokens"] > 0
    assert "shipped smollm2 run" in run.stderr
    _no_warnings(run.stderr)


def test_serve_with_no_flags_answers_with_expert_tokens():
    import openai

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "collm", "serve", "--port", str(port)], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        reply = client.chat.completions.create(model="collm", max_tokens=40, temperature=0,
                                               messages=[{"role": "user", "content": PROBLEMS[0]["prompt"]}])
        assert reply.usage.model_extra["expert_tokens"] > 0
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=60)
    _no_warnings(stderr)
