r"""Exports a trained model's smoothed classifier as a TF Serving model version.

Writes `<export_dir>/<version>/` (saved_model.pb, variables/, assets.extra/)
whose `serving_default` signature runs CERTIFY (Cohen et al., 2019) on every
image of a request and returns its class (-1 = abstain), certified L2 radius
and p_lower; `certify_radius` answers "is this image certified at this
radius?" (one radius per image), drawing the estimation samples in --stages
until each image is settled; `predict` runs PREDICT in the same stages; and
`metadata` tells what the certificate means (sigma, n0, n, stages, alpha,
class names, input shape). sigma, the class names and the input shape come
from the training run unless given. The signatures sample exact grid noise by
default (--noise=grid: requests must hold 8-bit images, float32(k) / 255, and
the certificates hold in floating point); --noise=float samples float32
Gaussian noise, for inputs that are not quantized. The version is written
beside its final place and renamed when complete; an existing version is never overwritten. A
killed export's hidden staging directory `<export_dir>/.<version>.incomplete-*`
is removed by the next export (once no process holds it).

Example:

  python bin/export.py --model_dir=runs/fmnist_consistency_0.50 \
      --export_dir=serving/fmnist_smoothed --n0=100 --n=10000 --alpha=0.001 \
      --check_images=2

  python bin/export.py --model=base_model.keras --sigma=0.25 \
      --export_dir=serving/smoothed --version=3 --n=100000 \
      --stages=100,1000,10000,100000

  python bin/export.py --classifier=classifier.keras --denoiser=denoiser.keras \
      --sigma=0.25 --export_dir=serving/denoised --n0=100 --n=10000

Installed with pip, this command is `tf-consreg-export`; from a checkout, `python bin/export.py`; either way
`python -m tf_consreg.commands.export`. The flags are the same.
"""

from tf_consreg import cli
from tf_consreg import export
from tf_consreg import stats

_FLAGS = cli.define_flags(export.VersionExportConfig, {
    "model_dir": "Training run directory (base_model.keras and train_config.json, from bin/train.py).",
    "model": "A .keras base model file, instead of --model_dir (needs --sigma).",
    "classifier": "With --denoiser, instead of --model_dir or --model: export f∘D, this classifier f (a .keras "
                  "model from images in [0, 1] to logits) behind the denoiser D (needs --sigma).",
    "denoiser": "With --classifier: the denoiser D, a .keras model from images in [0, 1] to images of the same shape "
                "(a denoiser.keras of bin/train.py --method=denoise, or your own).",
    "export_dir": "TF Serving's base path for the model: the version is written to <export_dir>/<version>/.",
    "sigma": "Noise standard deviation in [0, 1] pixel units (default: the training run's).",
    "n0": "CERTIFY's selection samples per image.",
    "n": "CERTIFY's estimation samples per image (and PREDICT's samples).",
    "alpha": "Failure probability of each certificate.",
    "batch_size": "Most noisy copies per forward pass in the server.",
    "stages": "certify_radius's and predict's cumulative sample counts, comma-separated, increasing, ending at --n "
              "(with more than one stage, starting at --n0 or above). The last stage runs its bounds at alpha / 2, "
              "each earlier one at alpha / (2 (K - 1)) (K stages, a union bound), and an image stops at the first stage that settles its answer. Default: --n "
              "times 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.5, 1, from max(--n0, 100) on (100, 300, ..., 100000 for "
              "--n=100000), which stops most images after a few hundred samples. --stages=<n> makes predict Cohen's "
              "fixed-n PREDICT.",
    "version": "TF Serving version number (default: the current Unix time).",
    "check_images": "After exporting, load the version back from disk and certify this many test images of the "
                    "run's dataset through serving_default, printing class and radius (needs --model_dir).",
    "noise": "grid (default): exact integer noise on the 8-bit grid, certificates sound in floating point; "
             "requests must hold pixels exactly float32(k) / 255, k in [0, 255], anything else is refused naming "
             "the first bad pixel. float: float32 Gaussian noise, for inputs that are not quantized (pixels in "
             "[0, 1]).",
    "compute_dtype": "float32: the export samples the network computing in float32, whatever policy it was trained "
                     "under. bfloat16: the network as mixed_bfloat16 computes it (float32 logits). The metadata "
                     "signature names it; the certificates hold for that function.",
    "max_batch": "Most images per request: every image signature refuses a larger request at once, before any "
                 "sampling, naming both sizes (as TF Serving's max_batch_size). A request costs up to max_batch x "
                 "(n0 + n) forward passes; memory does not grow with it (sampling goes in chunks of --batch_size).",
})


def main(argv):
    del argv
    config = cli.config_from_flags(export.VersionExportConfig, _FLAGS)
    exported = export.export_version(config)
    for path in exported.removed:
        print(f"Removed {path}, the unfinished staging directory of an export that was killed")
    spec = config.spec
    print(f"Exported the smoothed classifier (sigma={spec.sigma}, n0={spec.n0}, n={spec.n}, alpha={spec.alpha}, "
          f"noise={spec.noise}, stages={','.join(map(str, spec.stages))}, base model computing in {spec.compute_dtype}) to {exported.path}")
    if exported.check:
        names = export.read_metadata(exported.path)["class_names"]
        print(f"serving_default of the reloaded export on {len(exported.check['label'])} test image(s):")
        for i, (label, cls, radius) in enumerate(zip(*(exported.check[k] for k in ("label", "class", "radius")))):
            answer = "abstain" if cls == stats.ABSTAIN else f"class {cls} ({names[cls]}), radius {radius:.3f}"
            print(f"  image {i}: label {label} ({names[label]}) -> {answer}")


def run() -> None:
    """Runs the command on sys.argv: the console script tf-consreg-export, bin/export.py and `python -m`."""
    cli.run(main)


if __name__ == "__main__":
    run()
