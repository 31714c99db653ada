"""A ComfyUI server of its own on loopback, to run workflows headless (the demo's generation step).

``ComfyServer(base).start()`` runs ``python main.py --listen 127.0.0.1 --port <free> --base-directory <base>
--disable-auto-launch --database-url sqlite:///:memory:`` (plus ``--cpu`` without a GPU) from the ComfyUI
checkout that ``moe_core.comfy_runtime.find_comfyui`` finds, in its own process group, killed when this
process dies (PR_SET_PDEATHSIG) and always stopped by ``stop()``. ``base`` is a ComfyUI base directory the
caller has prepared (``custom_nodes/``, ``models/``); ComfyUI writes ``output/``, ``temp/`` and ``user/`` there.

A separate process rather than ComfyUI's executor in this one: the graph runs exactly as a user's ComfyUI runs
it (custom-node loading, validation, caching, model management), and the models it loads are freed when it
stops. Prompts are API-format graphs (``moe_core.workflow_api.convert`` turns a saved workflow into one);
``run()`` posts one and waits for its ``/history`` entry.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from moe_core.comfy_runtime import find_comfyui


class ServerError(RuntimeError):
    """ComfyUI did not start, died, refused a prompt or did not finish it in time (the message has its log)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child before exec
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class ComfyServer:
    """One ComfyUI server process on ``127.0.0.1`` for the base directory ``base``."""

    def __init__(self, base: str | os.PathLike, cpu: bool = True, threads: int | None = None,
                 extra_args: tuple[str, ...] = ()):
        self.base = Path(base).absolute()  # ComfyUI runs with the base as its working directory
        self.cpu = cpu
        self.threads = threads
        self.extra_args = tuple(extra_args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base / "server.log"
        self.startup_s: float | None = None
        self._object_info: dict | None = None
        self._log = None
        self._t0 = 0.0

    # -- lifecycle
    def prepare(self) -> None:
        """Fill the base directory before the server starts (subclasses; nothing here)."""

    def launch(self) -> "ComfyServer":
        """Start the process and return at once (``wait_ready()`` waits for it to answer)."""
        self.prepare()
        self.base.mkdir(parents=True, exist_ok=True)
        comfy = find_comfyui()
        cmd = [sys.executable, str(comfy / "main.py"), "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch", "--database-url", "sqlite:///:memory:",
               *(["--cpu"] if self.cpu else []), *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        env.pop("COMFYUI_PATH", None)
        self._t0 = time.monotonic()
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.base, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=_die_with_parent)
        return self

    def wait_ready(self, timeout: float = 180.0) -> "ComfyServer":
        while time.monotonic() - self._t0 < timeout:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise ServerError(f"ComfyUI exited with {code} (log {self.log_path}):\n{self.log_tail()}")
            try:
                if self.get("/system_stats", timeout=2)[0] == 200:
                    self.startup_s = time.monotonic() - self._t0
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"ComfyUI did not answer within {timeout:.0f} s (log {self.log_path}):\n{self.log_tail()}")

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        return self.launch().wait_ready(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ComfyServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, n: int = 80) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- HTTP
    def request(self, method: str, path: str, body: Any = None, timeout: float = 30) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw, status = r.read(), r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read(), e.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def get(self, path: str, timeout: float = 30) -> tuple[int, Any]:
        return self.request("GET", path, timeout=timeout)

    def object_info(self) -> dict:
        if self._object_info is None:
            status, info = self.get("/object_info", timeout=60)
            if status != 200:
                raise ServerError(f"/object_info answered {status}: {str(info)[:500]}")
            self._object_info = info
        return self._object_info

    def post_prompt(self, prompt: dict) -> tuple[int, dict]:
        return self.request("POST", "/prompt", {"prompt": prompt, "client_id": "wan-lora-moe"})

    def wait(self, prompt_id: str, timeout: float = 240, on_poll: Callable[[], None] | None = None) -> dict:
        """The /history entry of a prompt once it has finished (success or error)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if not self.alive():
                raise ServerError(f"ComfyUI died while running {prompt_id} (log {self.log_path}):\n{self.log_tail()}")
            status, hist = self.get(f"/history/{prompt_id}")
            if status == 200 and prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if on_poll is not None:
                on_poll()
            time.sleep(0.25)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s (log {self.log_path}):\n"
                          f"{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 240, on_poll: Callable[[], None] | None = None) -> dict:
        status, body = self.post_prompt(prompt)
        if status != 200:
            raise ServerError(f"ComfyUI refused the prompt ({status}): {json.dumps(body, ensure_ascii=False)[:3000]}")
        return self.wait(body["prompt_id"], timeout, on_poll)


def execution_error(entry: dict) -> str | None:
    """The node and message of a failed run's /history entry, or None if it succeeded."""
    status = entry.get("status", {})
    if status.get("status_str") == "success":
        return None
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return (f"node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_type')}: "
                    f"{data.get('exception_message', '').strip()}")
    return f"status {status.get('status_str')!r}"


def output_files(entry: dict, base: Path, kinds: tuple[str, ...] = ("images", "videos", "gifs"),
                 folder: str = "output") -> list[Path]:
    """Files a finished prompt wrote into ``base/<folder>`` (``output`` or ``temp``), from its /history outputs."""
    files = []
    for out in entry.get("outputs", {}).values():
        for kind in kinds:
            for item in out.get(kind, []):
                if item.get("type") == folder:
                    files.append(base / folder / item.get("subfolder", "") / item["filename"])
    return files


__all__ = ["ComfyServer", "ServerError", "execution_error", "free_port", "output_files"]
