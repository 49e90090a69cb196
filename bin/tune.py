"""Runs the tune command from a checkout: `python bin/tune.py --help` (installed: `tf-consreg-tune`).

The command, and the text its --help prints, is tf_consreg/commands/tune.py.
"""

from tf_consreg.commands import tune

if __name__ == "__main__":
    tune.run()
