"""Helpers shared by the absl binaries in bin/: one-line errors, safe writes.

Nothing here reads flags: binaries read their own flag handles and pass plain
values to the library.
"""

import contextlib
import os
import sys
import tempfile
from typing import Callable, Iterator, Sequence

from absl import app
from absl import flags
from absl import logging

from tf_consreg.errors import ConfigError


def run(main: Callable[[Sequence[str]], None], positional: bool = False) -> None:
    """Runs an absl `main`, turning `ConfigError` into one line on stderr.

    absl already reports unknown or malformed flags itself. Every check the
    library makes on values (ranges, files, combinations) raises
    `ConfigError`; the user sees `<program>: error: <message>` and exit
    status 2, with no traceback.

    Args:
      main: the binary's main function, as for `absl.app.run`.
      positional: the binary takes positional arguments (otherwise any is an error).
    """

    def _main(argv):
        if not flags.FLAGS["verbosity"].present:
            logging.set_verbosity(logging.WARNING)  # TensorFlow's INFO lines drown the progress bar.
        if len(argv) > 1 and not positional:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        try:
            main(argv)
        except ConfigError as e:
            prog = os.path.basename(sys.argv[0])
            print(f"{prog}: error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(_main)


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
