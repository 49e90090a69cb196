"""Runs the certify command from a checkout: `python bin/certify.py --help` (installed: `tf-consreg-certify`).

The command, and the text its --help prints, is tf_consreg/commands/certify.py.
"""

from tf_consreg.commands import certify

if __name__ == "__main__":
    certify.run()
