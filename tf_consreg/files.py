"""Files: written atomically (never half-written, never replaced by accident) and identified by digest."""

import contextlib
import hashlib
import os
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_output(path: str, mode: str = "w", replace: bool = True) -> Iterator:
    """Writes a file atomically: a temporary file renamed into place on success.

    A failure leaves no partial file at `path`, and an existing file at `path`
    is only replaced once the new content is complete.

    Args:
      path: destination file.
      mode: "w" for text or "wb" for bytes.
      replace: False to never replace an existing `path`: the complete file
        is hard-linked into place, which fails when `path` exists, so of
        several processes creating `path` at once exactly one succeeds.

    Yields:
      The open temporary file.

    Raises:
      FileExistsError: `replace` is False and `path` exists (nothing written).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual mode.
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # Atomic, and never replaces.
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
