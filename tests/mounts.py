"""Real file-system failures for tests: a read-only directory and a full one, as tmpfs mounts.

Mounting needs root (CI runs as root). Where it is refused, `tmpfs` yields
None and a test falls back to raising the same OS error (EROFS, ENOSPC) by
mock at the call that would meet it.
"""

import contextlib
import os
import subprocess
import tempfile
from typing import Iterator, Optional


@contextlib.contextmanager
def tmpfs(options: str) -> Iterator[Optional[str]]:
    """A fresh tmpfs mounted with `options` ("ro", "size=200k", ...), or None where mounting is refused."""
    path = tempfile.mkdtemp(prefix="tmpfs_")
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], check=True, capture_output=True,
                       timeout=30)
    except (OSError, subprocess.SubprocessError):
        os.rmdir(path)
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False, capture_output=True, timeout=30)
        os.rmdir(path)
