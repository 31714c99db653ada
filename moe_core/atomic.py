"""Atomic file writes: a temporary file in the destination folder, then ``os.replace``.

Checkpoints, LoRA-MoE files, manifests and cache files are read by later runs (and by ComfyUI) that trust
what they find. Writing them in place would leave a truncated file after a crash or Ctrl-C, which the next
run could take for a valid one. ``os.replace`` within one folder is atomic on POSIX and Windows, so readers
see either the old file or the complete new one.

The finished file gets the mode any new file gets (``0o666`` less the umask, usually ``0o644``), set just
before the rename: ``tempfile.mkstemp`` creates ``0o600`` files, and writers such as safetensors'
``save_file`` replace the temporary file with a new ``0o600`` one, which a ComfyUI running as another
user could not read.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def current_umask() -> int:
    """The process umask (read from /proc on Linux; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path``, on error delete it.

    The caller writes the complete file to the yielded path (with any library that takes a file name).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name keeps the real suffix last: tools such as ffmpeg pick the format from it.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=f".tmp{final.suffix}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())  # after writing: the writer may have replaced the file
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (flushed and fsynced before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding=encoding, newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)
