"""A real ComfyUI server on tiny SD1.5-width weights, for the native path's end-to-end tests.

Skipped unless COLORFLOW_COMFYUI names a ComfyUI checkout (0.3.64+). COLORFLOW_COMFYUI_PYTHON is the interpreter
that has ComfyUI's requirements (default: this one); COLORFLOW_COMFYUI_MODELS an existing `make-tiny --comfyui`
tree to reuse (default: one is written, ~3 GB, ~1 min). The server runs on CPU, offline, on loopback, and is
stopped after the session; its log is kept for the tests that check what ComfyUI loaded and unloaded.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ..nodes.conftest import colour_image, gray_page
from ..pack import ROOT

CHECKOUT = os.environ.get("COLORFLOW_COMFYUI")
PAGE = "colorflow_page_01.png"
REFS = "colorflow/refs"


class Server:
    """A running ComfyUI: queue API prompts, wait for them, read the log and the outputs."""

    def __init__(self, url: str, base: Path, log: Path, process: subprocess.Popen):
        self.url, self.base, self.log_file, self.process = url, base, log, process

    def request(self, path: str, data: dict | None = None) -> dict:
        body = None if data is None else json.dumps(data).encode()
        request = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answer:
            text = answer.read()
        return json.loads(text) if text else {}

    def queue(self, prompt: dict) -> str:
        try:
            return self.request("/prompt", {"prompt": prompt})["prompt_id"]
        except urllib.error.HTTPError as error:
            raise AssertionError(f"prompt refused: {error.read().decode()[:2000]}") from error

    def wait(self, prompt_id: str, timeout: float = 900) -> dict:
        """The history entry once the prompt finished (success, error or interrupt)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.request(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry["status"].get("completed") is not None and entry["status"]["status_str"] in ("success", "error"):
                return entry
            time.sleep(0.5)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s")

    def run(self, prompt: dict, timeout: float = 900) -> dict:
        """Queue, wait, and fail with ComfyUI's own message unless it succeeded."""
        entry = self.wait(self.queue(prompt), timeout)
        errors = [m for m in entry["status"]["messages"] if m[0] == "execution_error"]
        assert entry["status"]["status_str"] == "success", errors and errors[0][1].get("exception_message")
        return entry

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def outputs(self, entry: dict, node_id: str) -> list[Path]:
        images = entry["outputs"][node_id]["images"]
        return [self.base / image["type"] / image["subfolder"] / image["filename"] for image in images]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def comfy_models(tmp_path_factory) -> Path:
    if not CHECKOUT:
        pytest.skip("needs a ComfyUI checkout: set COLORFLOW_COMFYUI (see tests/comfyui/conftest.py)")
    given = os.environ.get("COLORFLOW_COMFYUI_MODELS")
    if given:
        return Path(given)
    from colorflow_core.tiny_comfyui import write_comfyui_tree

    folder = tmp_path_factory.mktemp("comfy-models")
    write_comfyui_tree(folder)
    return folder / "models"


@pytest.fixture(scope="session")
def server(comfy_models, tmp_path_factory) -> Server:
    """ComfyUI with this pack and the tiny models; stopped (and only it) at the end of the session."""
    base = tmp_path_factory.mktemp("comfy-base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "colorflow").symlink_to(ROOT, target_is_directory=True)
    (base / "models").symlink_to(comfy_models, target_is_directory=True)
    (base / "input" / REFS).mkdir(parents=True)
    gray_page(12).save(base / "input" / PAGE)
    for index in range(3):
        colour_image(index).save(base / "input" / REFS / f"ref{index}.png")
    port = _free_port()
    log = base / "server.log"
    python = os.environ.get("COLORFLOW_COMFYUI_PYTHON", sys.executable)
    command = [
        python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
        "--disable-auto-launch", "--disable-api-nodes", "--database-url", "sqlite:///:memory:", "--verbose", "DEBUG",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as sink:
        process = subprocess.Popen(command, cwd=CHECKOUT, stdout=sink, stderr=subprocess.STDOUT, env=env)
    running = Server(f"http://127.0.0.1:{port}", base, log, process)
    try:
        for _ in range(240):
            if process.poll() is not None:
                raise AssertionError(f"ComfyUI exited:\n{running.log()[-3000:]}")
            try:
                info = running.request("/object_info/ColorFlowApply")
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        else:
            raise AssertionError(f"ComfyUI did not start:\n{running.log()[-3000:]}")
        assert "ColorFlowApply" in info, f"the pack did not load:\n{running.log()[-3000:]}"
        yield running
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.copy(log, tmp_path_factory.getbasetemp() / "comfyui-server.log")
