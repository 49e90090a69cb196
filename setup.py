"""Packaging for tf_consreg: consistency-regularized randomized smoothing in TensorFlow."""

import glob
import os
import re

import setuptools

HERE = os.path.dirname(os.path.abspath(__file__))

# Every module of tf_consreg/commands is a command (see its __init__.py), installed as the console script
# tf-consreg-<name>: one program per command, since absl's flags are process-global.
COMMANDS = sorted(os.path.basename(path)[:-len(".py")]
                  for path in glob.glob(os.path.join(HERE, "tf_consreg", "commands", "*.py"))
                  if os.path.basename(path) != "__init__.py")

# A Markdown link whose target is a path in the repository (docs/training.md#...): no scheme, no in-page #anchor.
RELATIVE_LINK = re.compile(r"\[([^\]]+)\]\((?![a-z][a-z0-9+.-]*:|#)([^)\s]+)\)")


def pypi_description(readme: str) -> str:
    """The README as PyPI's project page shows it: each link to a repository path becomes plain text.

    PyPI resolves a relative link (docs/training.md) under pypi.org, where it
    is a 404; the repository records no public address to make it absolute
    against. So the link's text keeps its path, in code, for a reader with a
    checkout. The README in the repository keeps its links.
    """
    return RELATIVE_LINK.sub(lambda m: f"{m.group(1)} (`{m.group(2)}` in the repository)", readme)


with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    README = f.read()

setuptools.setup(
    name="tf_consreg",
    version="0.1.0",
    description=(
        "Consistency regularization for certified robustness of smoothed "
        "classifiers (Jeong & Shin, NeurIPS 2020) in TensorFlow/Keras 3."
    ),
    long_description=pypi_description(README),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["tf_consreg", "tf_consreg.*"]),
    entry_points={"console_scripts": [f"tf-consreg-{name} = tf_consreg.commands.{name}:run" for name in COMMANDS]},
    # The training flagfiles (configs/*.flags), for --flagfile: installed as
    # <prefix>/share/tf_consreg/configs/ (in a venv, $VIRTUAL_ENV/share/...).
    # The commands read no other file of their own at run time.
    data_files=[("share/tf_consreg/configs", sorted(glob.glob("configs/*.flags", root_dir=HERE)))],
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "tensorflow-datasets>=4.9",
        "importlib_resources",  # tensorflow-datasets needs it to prepare datasets.
        "keras-tuner>=1.4",
        "scikit-learn>=1.3",  # keras-tuner's Bayesian optimization.
        "scipy>=1.11",
        "absl-py>=2.1",
        "tensorboard>=2.21",
        "matplotlib>=3.8",
        "tensorflow-serving-api>=2.19",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3", "statsmodels>=0.14", "mpmath>=1.3"],
    },
)
