"""Helpers for the serve tests: a tiny pair whose head really routes, and a live uvicorn on loopback."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import torch
import uvicorn
from conftest import make_llama, make_tokenizer

from collm import CoLLM, DeferralHead


def tiny_pair() -> CoLLM:
    """Two tiny Llamas and a random head, so that at threshold 0.5 some tokens are the expert's and some not."""
    torch.manual_seed(7)
    head = DeferralHead(32, 1)
    torch.nn.init.normal_(head.linear.weight, std=0.5)
    torch.nn.init.zeros_(head.linear.bias)
    return CoLLM(make_llama(0), [make_llama(1)], head, make_tokenizer(), info={"base": "tiny-0", "experts": ["tiny-1"]})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live(app):
    """Serve ``app`` on 127.0.0.1 at a free port in a thread; yields the base URL; stops the server after."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
