"""Runs the export command from a checkout: `python bin/export.py --help` (installed: `tf-consreg-export`).

The command, and the text its --help prints, is tf_consreg/commands/export.py.
"""

from tf_consreg.commands import export

if __name__ == "__main__":
    export.run()
