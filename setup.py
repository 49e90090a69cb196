"""Packaging for tf_consreg: consistency-regularized randomized smoothing in TensorFlow."""

import setuptools

setuptools.setup(
    name="tf_consreg",
    version="0.1.0",
    description=(
        "Consistency regularization for certified robustness of smoothed "
        "classifiers (Jeong & Shin, NeurIPS 2020) in TensorFlow/Keras 3."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["tf_consreg", "tf_consreg.*"]),
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
