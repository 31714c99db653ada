"""Test setup: make the real ComfyUI importable (on the CPU) before any test module imports ``comfy``.

ComfyUI is never mocked and its tests are never skipped: if it cannot be found, collection fails with
``find_comfyui``'s message (``scripts/run_tests.sh`` finds or fetches it first).

Notes: ComfyUI's root goes first on ``sys.path`` and owns the top-level names ``nodes``, ``utils`` and
``tests``, so this repo's ``nodes/`` is not importable as ``nodes`` (import the pack as a package).
pytest's rootdir is ``tests/`` (``tests/pytest.ini``) so that pytest never imports the repo root's
``__init__.py`` itself; ``tests/`` is on ``sys.path`` (rootdir-relative "prepend" import mode).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from moe_core.comfy_runtime import ensure_comfy  # noqa: E402

COMFYUI_ROOT = ensure_comfy(cpu=True)

import pytest  # noqa: E402
import torch  # noqa: E402

# The test models are tiny, so CPU time is latency, not throughput: intra-op threads only add
# synchronisation, and on a shared or busy 2-core machine they oversubscribe the cores (4 sampler
# steps measured 0.2 s with 1 thread, 1.5-3 s with 2 threads under load). Override with WLM_TEST_THREADS.
torch.set_num_threads(int(os.environ.get("WLM_TEST_THREADS", "1")))

import wan_fixtures  # noqa: E402


def pytest_report_header(config):
    from moe_core.comfy_runtime import comfyui_version

    return (f"ComfyUI {comfyui_version(COMFYUI_ROOT)} at {COMFYUI_ROOT}; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: the tiny models' ops are too small to gain from more, and the
    training tests' timings stay steady on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def comfyui_root() -> Path:
    return COMFYUI_ROOT


@pytest.fixture(scope="session")
def tiny_wan_state_dict():
    """Factory ``(seed=0, num_layers=10, dim=128, ffn_dim=256) -> state dict`` of a tiny WAN DiT.

    Built once per argument set per session; each call returns a new dict (the tensors are shared, so
    copy a tensor before changing it in place).
    """
    cache: dict[tuple, dict] = {}

    def make(seed: int = 0, num_layers: int = 10, dim: int = 128, ffn_dim: int = 256):
        key = (seed, num_layers, dim, ffn_dim)
        if key not in cache:
            cache[key] = wan_fixtures.tiny_wan_state_dict(seed, num_layers, dim, ffn_dim)
        return dict(cache[key])

    return make


@pytest.fixture
def tiny_wan(tiny_wan_state_dict):
    """A fresh ``ModelPatcher`` of the default tiny WAN, loaded through ComfyUI (patch it freely)."""
    return wan_fixtures.load_tiny_wan(tiny_wan_state_dict())


@pytest.fixture(scope="session")
def wan_contexts():
    """``(positive, negative)`` stand-in text embeddings, ``[1, 8, 4096]`` each, seeded."""
    return wan_fixtures.make_context(1), wan_fixtures.make_context(2)


@pytest.fixture(scope="session")
def wan_sample():
    """``wan_fixtures.sample``: ComfyUI's real sampler on a (1, 16, 3, 8, 8) latent."""
    return wan_fixtures.sample
