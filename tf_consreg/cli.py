"""What the absl binaries in bin/ share: their runner, which turns errors into one line.

Nothing here reads flags: binaries read their own flag handles and pass plain
values to the library.
"""

import os
import sys
from typing import Callable, Sequence

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
