"""A real vLLM server (the CPU build in .venv-vllm/, see scripts/install_vllm.sh) on loopback, for tests and bench.

``with VllmServer(folder) as server: server.url`` starts ``vllm.entrypoints.openai.api_server`` on 127.0.0.1 and a
free port in its own process group, waits until ``/health`` answers, and stops the whole group on exit (vLLM
forks an engine process; killing only the API process would leave it running).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("COLLM_VLLM_VENV", ROOT / ".venv-vllm"))


def vllm_python() -> Path | None:
    """The vLLM environment's python, or None where scripts/install_vllm.sh has not been run."""
    python = VENV / "bin" / "python"
    return python if python.exists() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """One vLLM server process group serving ``folder`` (an HF folder with its tokenizer) as ``name``."""

    def __init__(self, folder: str | Path, name: str = "expert", *, prefix_caching: bool = True, eager: bool = False,
                 max_model_len: int = 2048, start_timeout: float = 900.0):
        """``eager``: skip torch.compile (vLLM recompiles at every start here, minutes on two busy cores; tests
        want a quick start, benchmarks the compiled model)."""
        self.folder, self.name, self.prefix_caching, self.eager = str(folder), name, prefix_caching, eager
        self.max_model_len, self.start_timeout = max_model_len, start_timeout
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.log = Path(tempfile.mkstemp(prefix="vllm-", suffix=".log")[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def spec(self) -> str:
        return f"{self.url}#{self.name}"

    def start(self) -> "VllmServer":
        python = vllm_python()
        if python is None:
            raise RuntimeError(f"no vLLM environment at {VENV}: run scripts/install_vllm.sh")
        command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", self.folder,
                   "--served-model-name", self.name, "--dtype", "float32", "--host", "127.0.0.1",
                   "--port", str(self.port), "--max-model-len", str(self.max_model_len),
                   "--generation-config", "vllm",  # the request's sampling, not the model folder's defaults
                   "--enable-prefix-caching" if self.prefix_caching else "--no-enable-prefix-caching",
                   *(["--enforce-eager"] if self.eager else [])]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env |= {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_LOGGING_LEVEL": "WARNING"}
        env.setdefault("OMP_NUM_THREADS", "1")
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)  # its own group: stop() reaches the engine too
        self._wait_healthy()
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.process.returncode} while starting:\n{self.tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"vLLM did not become healthy in {self.start_timeout:.0f}s:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL the whole group at once: a server that dies mid-answer."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM the group, then SIGKILL what is left after 15 s."""
        if self.process is None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        self._signal(signal.SIGKILL)
        self.process.wait()

    def _signal(self, sig) -> None:
        try:
            os.killpg(self.process.pid, sig)  # start_new_session made the server's pid its group id
        except ProcessLookupError:
            pass

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
