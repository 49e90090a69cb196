"""Runs the train command from a checkout: `python bin/train.py --help` (installed: `tf-consreg-train`).

The command, and the text its --help prints, is tf_consreg/commands/train.py.
"""

from tf_consreg.commands import train

if __name__ == "__main__":
    train.run()
