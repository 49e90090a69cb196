r"""Exports a trained model's smoothed classifier as a TF Serving model version.

Writes `<export_dir>/<version>/` (saved_model.pb, variables/, assets.extra/)
whose `serving_default` signature runs CERTIFY (Cohen et al., 2019) on every
image of a request and returns its class (-1 = abstain), certified L2 radius
and p_lower; `predict` runs PREDICT and `metadata` tells what the certificate
means (sigma, n0, n, alpha, class names, input shape). sigma, the class names
and the input shape come from the training run unless given. The version is
written beside its final place and renamed when complete; an existing version
is never overwritten.

Example:

  python bin/export.py --model_dir=runs/fmnist_consistency_0.50 \
      --export_dir=serving/fmnist_smoothed --n0=100 --n=10000 --alpha=0.001 \
      --check_images=2

  python bin/export.py --model=base_model.keras --sigma=0.25 \
      --export_dir=serving/smoothed --version=3
"""

from absl import flags

from tf_consreg import cli  # Sets TensorFlow's environment before TensorFlow loads.
from tf_consreg import export
from tf_consreg import stats

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Training run directory (base_model.keras and "
                                 "train_config.json, from bin/train.py).")
_MODEL = flags.DEFINE_string("model", None, "A .keras base model file, instead of --model_dir (needs --sigma).")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "TF Serving's base path for the model: the version is "
                                  "written to <export_dir>/<version>/.")
_SIGMA = flags.DEFINE_float("sigma", None, "Noise standard deviation in [0, 1] pixel units (default: the "
                            "training run's).")
_N0 = flags.DEFINE_integer("n0", 100, "CERTIFY's selection samples per image.")
_N = flags.DEFINE_integer("n", 10000, "CERTIFY's estimation samples per image (and PREDICT's samples).")
_ALPHA = flags.DEFINE_float("alpha", 0.001, "Failure probability of each certificate.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 1000, "Most noisy copies per forward pass in the server.")
_VERSION = flags.DEFINE_integer("version", None, "TF Serving version number (default: the current Unix time).")
_CHECK_IMAGES = flags.DEFINE_integer("check_images", 0, "After exporting, load the version back from disk and "
                                     "certify this many test images of the run's dataset through serving_default, "
                                     "printing class and radius (needs --model_dir).")


def make_config() -> export.VersionExportConfig:
    """Builds the validated config from the flags."""
    return export.VersionExportConfig(
        export_dir=_EXPORT_DIR.value, model_dir=_MODEL_DIR.value, model=_MODEL.value, sigma=_SIGMA.value,
        n0=_N0.value, n=_N.value, alpha=_ALPHA.value, batch_size=_BATCH_SIZE.value, version=_VERSION.value,
        check_images=_CHECK_IMAGES.value)


def main(argv):
    del argv
    config = make_config()
    exported = export.export_version(config)
    print(f"Exported the smoothed classifier (sigma={config.sigma}, n0={config.n0}, n={config.n}, "
          f"alpha={config.alpha}) to {exported.path}")
    if exported.check:
        names = export.read_metadata(exported.path)["class_names"]
        print(f"serving_default of the reloaded export on {len(exported.check['label'])} test image(s):")
        for i, (label, cls, radius) in enumerate(zip(*(exported.check[k] for k in ("label", "class", "radius")))):
            answer = "abstain" if cls == stats.ABSTAIN else f"class {cls} ({names[cls]}), radius {radius:.3f}"
            print(f"  image {i}: label {label} ({names[label]}) -> {answer}")


if __name__ == "__main__":
    cli.run(main)
