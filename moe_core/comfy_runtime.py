"""Find a ComfyUI checkout and make its ``comfy`` package usable outside the ComfyUI server.

The pack runs in two settings:

* inside ComfyUI (``ComfyUI/custom_nodes/<this pack>``): ``main.py`` has already put ComfyUI on
  ``sys.path`` and parsed its command line; nothing needs doing;
* headless (tests, the trainer, benchmarks): ComfyUI is not installable from PyPI, so a checkout has to
  be found, put on ``sys.path``, and ComfyUI's global ``args`` (``comfy.cli_args``) initialised before
  ``comfy.model_management`` is imported, because that module picks the device at import time.

This module only imports the standard library at import time, so it can be used by ``scripts/`` before
torch or ComfyUI are importable (``python -c 'from moe_core.comfy_runtime import find_comfyui'``).
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

PINNED_COMFYUI_COMMIT = "a125cd84b054a57729b5eecab930ca9408719832"
"""The ComfyUI commit (version 0.3.64) the pack is developed and tested against."""

MIN_COMFYUI_VERSION = "0.3.64"
"""Oldest ComfyUI version the pack supports (read from ``comfyui_version.py``)."""

COMFYUI_REPO_URL = "https://github.com/comfyanonymous/ComfyUI"
DEFAULT_COMFYUI_DIR = "~/.cache/comfyui/ComfyUI"
ENV_VAR = "COMFYUI_PATH"

# Files that make a directory a ComfyUI checkout (not merely a folder holding some ``comfy`` package).
_REQUIRED_FILES = ("comfy/sd.py", "main.py", "comfyui_version.py")


class ComfyUINotFound(RuntimeError):
    """No usable ComfyUI checkout was found; the message lists where we looked and how to provide one."""


class ComfyUIVersionError(RuntimeError):
    """The ComfyUI that was found is older than :data:`MIN_COMFYUI_VERSION`."""


def _missing_files(path: Path) -> list[str]:
    return [name for name in _REQUIRED_FILES if not (path / name).is_file()]


def _enclosing_comfyui() -> Path | None:
    """The ComfyUI whose ``custom_nodes`` folder holds this pack, if any.

    Both the path as imported and the resolved path are walked, so a pack symlinked into
    ``custom_nodes`` is recognised as well as a pack checked out there.
    """
    here = Path(__file__).absolute()
    for start in (here, here.resolve()):
        for parent in start.parents:
            root = parent.parent
            if parent.name == "custom_nodes" and (root / "comfy").is_dir() and (root / "main.py").is_file():
                return root
    return None


def _how_to_provide() -> str:
    return (
        "Provide ComfyUI (>= {min}) in one of these ways:\n"
        "  * set {env}=/path/to/ComfyUI, or\n"
        "  * install this pack in ComfyUI/custom_nodes/, or\n"
        "  * git clone {url} {default} && git -C {default} checkout {commit}"
    ).format(min=MIN_COMFYUI_VERSION, env=ENV_VAR, url=COMFYUI_REPO_URL, default=DEFAULT_COMFYUI_DIR,
             commit=PINNED_COMFYUI_COMMIT[:8])


def find_comfyui() -> Path:
    """Return the root of the ComfyUI checkout to use.

    Order: ``$COMFYUI_PATH``; the ComfyUI that holds this pack (``<root>/custom_nodes/<pack>``);
    ``~/.cache/comfyui/ComfyUI``. A candidate counts only if it has ``comfy/sd.py``, ``main.py`` and
    ``comfyui_version.py``. An explicitly set ``$COMFYUI_PATH`` that is not a checkout is an error, not
    something to silently skip: the user asked for that one.

    Raises:
        ComfyUINotFound: naming every place tried and why it was rejected.
    """
    tried: list[str] = []
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        path = Path(env).expanduser().absolute()
        missing = _missing_files(path)
        if not missing:
            return path
        raise ComfyUINotFound(
            f"${ENV_VAR}={env} is not a ComfyUI checkout (missing: {', '.join(missing)}).\n" + _how_to_provide()
        )
    tried.append(f"${ENV_VAR}: not set")

    enclosing = _enclosing_comfyui()
    if enclosing is not None:
        missing = _missing_files(enclosing)
        if not missing:
            return enclosing
        tried.append(f"{enclosing} (holds this pack): missing {', '.join(missing)}")
    else:
        tried.append(f"enclosing ComfyUI: {Path(__file__).absolute().parent.parent} is not inside custom_nodes/")

    default = Path(DEFAULT_COMFYUI_DIR).expanduser()
    missing = _missing_files(default)
    if not missing:
        return default
    tried.append(f"{default}: " + ("does not exist" if not default.exists() else f"missing {', '.join(missing)}"))

    raise ComfyUINotFound("ComfyUI not found. Tried:\n" + "\n".join(f"  - {t}" for t in tried) + "\n"
                          + _how_to_provide())


def comfyui_version(root: Path) -> str:
    """The ``__version__`` string of ``root/comfyui_version.py``, read as text (not imported)."""
    text = (Path(root) / "comfyui_version.py").read_text(encoding="utf-8")
    match = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", text)
    if not match:
        raise ComfyUIVersionError(f"cannot read __version__ from {root}/comfyui_version.py")
    return match.group(1)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def check_version(root: Path) -> str:
    """Return ComfyUI's version, raising :class:`ComfyUIVersionError` if it is below the minimum."""
    version = comfyui_version(root)
    if _version_tuple(version) < _version_tuple(MIN_COMFYUI_VERSION):
        raise ComfyUIVersionError(
            f"ComfyUI at {root} is version {version}; this pack needs >= {MIN_COMFYUI_VERSION} "
            f"(tested with commit {PINNED_COMFYUI_COMMIT[:8]}). Update it with `git -C {root} pull`."
        )
    return version


def _importable_comfyui() -> Path | None:
    """Root of the ComfyUI whose ``comfy`` package is already importable, if it is a real checkout."""
    module = sys.modules.get("comfy")
    if module is not None:
        locations = list(getattr(module, "__path__", []))
    else:
        spec = importlib.util.find_spec("comfy")
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        root = Path(location).absolute().parent
        if not _missing_files(root):
            return root
    if module is not None:
        raise ComfyUINotFound(
            f"a module named 'comfy' is already imported from {locations or module!r}, and it is not ComfyUI. "
            "Call ensure_comfy() before anything imports it, or uninstall the conflicting package."
        )
    return None


def ensure_comfy(cpu: bool | None = None) -> Path:
    """Make ``import comfy...`` work and return the ComfyUI root. Idempotent.

    Inside ComfyUI (``comfy`` already importable from a real checkout whose ``comfy.cli_args`` is loaded)
    this changes nothing. Otherwise ComfyUI is found with :func:`find_comfyui`, inserted at
    ``sys.path[0]`` (ComfyUI's own top-level modules such as ``nodes``, ``folder_paths`` and ``utils``
    must win over same-named modules elsewhere), and ComfyUI's argument parser is run on a command line
    holding only ``--cpu`` (or nothing). Without this, importing ``comfy.cli_args`` would either parse
    *our* program's ``sys.argv`` (and exit on unknown flags) or, without ``--cpu``, make
    ``comfy.model_management`` try CUDA on a machine without a GPU.

    Args:
        cpu: force ComfyUI onto the CPU; ``None`` means "CPU if ``torch.cuda.is_available()`` is false".

    Raises:
        ComfyUINotFound: no checkout found. ComfyUIVersionError: the checkout is too old.
    """
    root = _importable_comfyui()
    if root is None:
        root = find_comfyui()
    check_version(root)
    root_str = str(root)
    if root_str not in sys.path:
        sys.path.insert(0, root_str)

    if "comfy.cli_args" in sys.modules:
        # ComfyUI's arguments are already parsed (we run inside ComfyUI, or a previous call did it).
        # Only honour an explicit cpu=True if no device has been chosen yet.
        if cpu and "comfy.model_management" not in sys.modules:
            sys.modules["comfy.cli_args"].args.cpu = True
        return root

    if cpu is None:
        import torch  # deferred: this module must stay importable without torch

        cpu = not torch.cuda.is_available()
    flags = ["--cpu"] if cpu else []

    import comfy.options

    comfy.options.enable_args_parsing()
    saved_argv = sys.argv
    sys.argv = [saved_argv[0] if saved_argv else "comfy"] + flags
    try:
        import comfy.cli_args  # noqa: F401  (parses sys.argv once, at import)
    finally:
        sys.argv = saved_argv
    return root


__all__ = [
    "ComfyUINotFound",
    "ComfyUIVersionError",
    "MIN_COMFYUI_VERSION",
    "PINNED_COMFYUI_COMMIT",
    "check_version",
    "comfyui_version",
    "ensure_comfy",
    "find_comfyui",
]


if __name__ == "__main__":
    # `python -m moe_core.comfy_runtime`: print the ComfyUI root, or the reason there is none (exit 2).
    try:
        root = find_comfyui()
        check_version(root)
        print(root)
    except (ComfyUINotFound, ComfyUIVersionError) as error:
        print(error, file=sys.stderr)
        sys.exit(2)
