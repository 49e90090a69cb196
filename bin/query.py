"""Runs the query command from a checkout: `python bin/query.py --help` (installed: `tf-consreg-query`).

The command, and the text its --help prints, is tf_consreg/commands/query.py.
"""

from tf_consreg.commands import query

if __name__ == "__main__":
    query.run()
