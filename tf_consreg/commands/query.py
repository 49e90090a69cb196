r"""Sends test images to an exported smoothed classifier and prints class and radius.

The model answers with CERTIFY (`serving_default`: class, certified L2 radius,
p_lower), CERTIFY at a radius (`--signature=certify_radius --radius=r`: class,
certified at r or not, radius, samples) or PREDICT (`--signature=predict`:
class). It is reached either
locally, through TensorFlow's own SavedModel loader (`--export_dir`: a
SavedModel or a TF Serving base path, whose newest version is used), or on a
running TF Serving (`--rest=host:8501` or `--grpc=host:8500`).

Every answer is checked against its signature's contract
(`serving_client.check_answer`, with the export's metadata; over REST, with
the dataset's classes) before a row is printed: a malformed answer, a
SavedModel that bin/export.py did not write, or a --radius that float32
cannot hold is one error line and exit status 2.

Examples:

  python bin/query.py --export_dir=serving/fmnist_smoothed --indices=0,1,2

  python bin/query.py --rest=localhost:8501 --model_name=fmnist_smoothed \
      --dataset=fashion_mnist --indices=0,1,2

  python bin/query.py --export_dir=serving/fmnist_smoothed \
      --signature=certify_radius --radius=0.5 --indices=0,1,2
"""

import os
import time

from absl import flags

import numpy as np

from tf_consreg import cli
from tf_consreg import serving_client
from tf_consreg.errors import ConfigError
from tf_consreg.signatures import CERTIFY_RADIUS_SIGNATURE, INPUT_KEY, METADATA_SIGNATURE, PREDICT_SIGNATURE
from tf_consreg.signatures import RADIUS_KEY, SERVING_SIGNATURE

_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "A SavedModel, or a TF Serving base path holding "
                                  "numbered versions (the newest is used).")
_REST = flags.DEFINE_string("rest", None, "host:port of a TF Serving REST API (8501 in its container).")
_GRPC = flags.DEFINE_string("grpc", None, "host:port of a TF Serving gRPC API (8500 in its container).")
_MODEL_NAME = flags.DEFINE_string("model_name", "smoothed", "The model's name in TF Serving.")
_SIGNATURE = flags.DEFINE_string("signature", "certify", "certify (serving_default), certify_radius or predict.")
_RADIUS = flags.DEFINE_float("radius", None, "With --signature=certify_radius: the L2 radius asked of every image.")
_DATASET = flags.DEFINE_string("dataset", "fashion_mnist", "Dataset the images come from.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Dataset files (see bin/train.py --data_dir).")
_SPLIT = flags.DEFINE_string("split", "test", "Split the images come from.")
_INDICES = flags.DEFINE_list("indices", ["0"], "Indices of the images in the split, comma-separated.")

_SIGNATURES = {"certify": SERVING_SIGNATURE, "certify_radius": CERTIFY_RADIUS_SIGNATURE, "predict": PREDICT_SIGNATURE}
# The inputs of bin/export.py's signatures, by which a SavedModel is recognized as one of its exports.
_EXPORT_INPUTS = {SERVING_SIGNATURE: {INPUT_KEY}, CERTIFY_RADIUS_SIGNATURE: {INPUT_KEY, RADIUS_KEY},
                  PREDICT_SIGNATURE: {INPUT_KEY}, METADATA_SIGNATURE: set()}


def _saved_model_dir(path: str) -> str:
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    try:
        versions = [d for d in os.listdir(path) if d.isdigit()
                    and os.path.isfile(os.path.join(path, d, "saved_model.pb"))] if os.path.isdir(path) else []
    except OSError as e:
        raise ConfigError(f"--export_dir={path} cannot be read: {e.strerror}") from e
    if not versions:
        raise ConfigError(f"--export_dir={path} holds no SavedModel nor numbered versions; run bin/export.py")
    return os.path.join(path, max(versions, key=int))


def _float32_radius(radius: float) -> np.float32:
    """--radius as the signature takes it, float32, which must still be finite and > 0."""
    with np.errstate(over="ignore", under="ignore"):
        value = np.float32(radius)
    if not (np.isfinite(value) and value > 0):
        raise ConfigError(f"--radius={radius:g} is {value} in float32, the dtype the model takes; give a radius "
                          f"between {np.finfo(np.float32).smallest_subnormal:g} and {np.finfo(np.float32).max:g}")
    return value


def _load_export(directory: str):
    """Loads an export of bin/export.py; returns (the loaded SavedModel, the contract its metadata states).

    Raises:
      ConfigError: saved_model.pb cannot be read, or the SavedModel lacks
        bin/export.py's signatures or metadata.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    try:
        loaded = tf.saved_model.load(directory)
    except (OSError, ValueError, tf.errors.OpError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{os.path.join(directory, 'saved_model.pb')} is not a readable SavedModel: "
                          f"{first_line}") from e
    missing = [name for name in _EXPORT_INPUTS if name not in loaded.signatures]
    if missing:
        raise ConfigError(f"--export_dir: the SavedModel in {directory} lacks the signature(s) {', '.join(missing)} "
                          "of bin/export.py; export the model with bin/export.py")
    for name, inputs in _EXPORT_INPUTS.items():
        takes = set(loaded.signatures[name].structured_input_signature[1])
        if takes != inputs:
            raise ConfigError(f"--export_dir: the SavedModel in {directory} is not an export of bin/export.py: its "
                              f"{name} signature takes {', '.join(sorted(takes)) or 'nothing'}, not "
                              f"{', '.join(sorted(inputs)) or 'nothing'}")
    metadata = {}
    for key, value in loaded.signatures[METADATA_SIGNATURE]().items():
        value = np.asarray(value.numpy()).tolist()  # a string scalar comes back as bytes
        metadata[key] = value.decode() if isinstance(value, bytes) else value
    try:
        contract = serving_client.Contract.from_metadata(metadata)
    except serving_client.ContractError as e:
        raise ConfigError(f"--export_dir: the SavedModel in {directory}: {e}") from e
    return loaded, contract


def _query_local(directory: str, signature: str, batch: np.ndarray, radius) -> dict:
    """Runs one signature of an export in this process; returns its checked outputs."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    loaded, contract = _load_export(directory)
    inputs = {INPUT_KEY: tf.constant(batch)}
    if radius is not None:
        inputs[RADIUS_KEY] = tf.fill([len(batch)], tf.constant(radius, tf.float32))
    try:
        outputs = {k: v.numpy() for k, v in loaded.signatures[signature](**inputs).items()}
    except tf.errors.InvalidArgumentError as e:  # The export's own checks of the request.
        # The message opens with "Graph execution error:" and the node; the export's words are in the line
        # of the failed assertion.
        lines = [line.strip() for line in e.message.splitlines() if line.strip()] or [type(e).__name__]
        reason = next((line for line in lines if "must be" in line), lines[0])
        raise ConfigError(f"{directory}: the {signature} signature refused the request: {reason}") from e
    try:
        return serving_client.check_answer(signature, outputs, len(batch), contract,
                                           radius=None if radius is None else np.full(len(batch), radius))
    except serving_client.ContractError as e:
        raise ConfigError(f"{directory}: the {signature} answer breaks its contract: {e}") from e


def _host_port(value: str, flag: str):
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--{flag}={value!r} is not host:port")
    return host, int(port)


def main(argv):
    del argv
    targets = [f for f in (_EXPORT_DIR, _REST, _GRPC) if f.value]
    if len(targets) != 1:
        raise ConfigError("give exactly one of --export_dir, --rest and --grpc")
    if _SIGNATURE.value not in ("certify", "certify_radius", "predict"):
        raise ConfigError(f"--signature={_SIGNATURE.value!r} is unknown; choose certify, certify_radius or predict")
    at_radius = _SIGNATURE.value == "certify_radius"
    if at_radius != (_RADIUS.value is not None):
        raise ConfigError("give --radius with --signature=certify_radius, and only then")
    if at_radius and not (np.isfinite(_RADIUS.value) and _RADIUS.value > 0):
        raise ConfigError(f"--radius must be finite and > 0, got {_RADIUS.value}")
    radius = _float32_radius(_RADIUS.value) if at_radius else None
    try:
        indices = [int(i) for i in _INDICES.value]
    except ValueError as e:
        raise ConfigError(f"--indices must be integers, got {_INDICES.value}") from e
    local_dir = _saved_model_dir(_EXPORT_DIR.value) if _EXPORT_DIR.value else None
    rest = _host_port(_REST.value, "rest") if _REST.value else None
    grpc_target = ":".join(map(str, _host_port(_GRPC.value, "grpc"))) if _GRPC.value else None

    # TensorFlow (which data.py loads) only after the flags are checked: a bad flag fails at once.
    from tf_consreg import data  # pylint: disable=import-outside-toplevel

    images, labels = data.load_arrays(_DATASET.value, _SPLIT.value, data_dir=_DATA_DIR.value)
    bad = [i for i in indices if not 0 <= i < len(images)]
    if bad:
        raise ConfigError(f"--indices {bad} outside the {len(images)} images of {_DATASET.value}/{_SPLIT.value}")
    batch, batch_labels = images[indices], labels[indices]

    # Every answer is checked against its signature's contract before a row is printed.
    start = time.perf_counter()
    if local_dir:
        outputs = _query_local(local_dir, _SIGNATURES[_SIGNATURE.value], batch, radius)
        where = local_dir
    else:
        if rest:
            # REST cannot call the metadata signature: the classes are the dataset's.
            contract = serving_client.Contract(num_classes=data.get_dataset_info(_DATASET.value).num_classes)
            client = serving_client.RestClient(*rest, _MODEL_NAME.value, contract=contract)
        else:
            client = serving_client.GrpcClient(grpc_target, _MODEL_NAME.value)  # checks with the metadata
        try:
            if _SIGNATURE.value == "certify":
                outputs = dict(zip(("class", "radius", "p_lower"), client.certify(batch)))
            elif at_radius:
                outputs = dict(zip(("class", "certified", "radius", "samples"), client.certify_radius(batch, radius)))
            else:
                outputs = {"class": client.predict(batch)}
        except serving_client.ServingError as e:  # No server, it refused the request, or its answer is bad.
            raise ConfigError(str(e)) from e
        where = _REST.value or _GRPC.value
    elapsed = time.perf_counter() - start

    print(f"{_SIGNATURE.value} on {len(indices)} image(s) from {where} in {elapsed:.2f} s")
    if at_radius:
        print(f"certified at radius {_RADIUS.value}: {int(np.sum(outputs['certified']))} of {len(indices)}")
    columns = [c for c in ("class", "certified", "radius", "p_lower", "samples") if c in outputs]
    print("\t".join(["idx", "label", *columns]))
    formats = {"class": "{}", "certified": "{}", "radius": "{:.3f}", "p_lower": "{:.4f}", "samples": "{}"}
    for row, (i, label) in enumerate(zip(indices, batch_labels)):
        print("\t".join([str(i), str(label), *(formats[c].format(outputs[c][row]) for c in columns)]))


def run() -> None:
    """Runs the command on sys.argv: the console script tf-consreg-query, bin/query.py and `python -m`."""
    cli.run(main)


if __name__ == "__main__":
    run()
