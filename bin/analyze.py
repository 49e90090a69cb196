"""Runs the analyze command from a checkout: `python bin/analyze.py --help` (installed: `tf-consreg-analyze`).

The command, and the text its --help prints, is tf_consreg/commands/analyze.py.
"""

from tf_consreg.commands import analyze

if __name__ == "__main__":
    analyze.run()
