"""Runs the predict command from a checkout: `python bin/predict.py --help` (installed: `tf-consreg-predict`).

The command, and the text its --help prints, is tf_consreg/commands/predict.py.
"""

from tf_consreg.commands import predict

if __name__ == "__main__":
    predict.run()
