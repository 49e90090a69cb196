"""Clients for a smoothed classifier exported by `export_smoothed` and served by TF Serving.

REST (TF Serving's port 8501) goes through urllib, with no extra dependency;
gRPC (port 8500) uses `tensorflow-serving-api`'s `PredictionServiceStub`:

    from tf_consreg.serving_client import GrpcClient, RestClient

    client = RestClient("localhost", 8501, "smoothed")
    classes, radii, p_lower = client.certify(images)  # float32 [N, H, W, C] in [0, 1]
    answer = client.certify_radius(images, 0.5)       # certified at L2 radius 0.5? (staged)
    classes = client.predict(images)                  # PREDICT; -1 = abstain

    with GrpcClient("localhost:8500", "smoothed") as client:
        certificate = client.certify(images)
        print(client.metadata())  # sigma, n0, n, alpha, class names, ...

A class of -1 means the smoothed classifier abstains (its radius is 0).
A `certify` request runs n0 + n forward passes per image on the server
(`certify_radius` and `predict` at most that many), so give large requests a
generous `timeout`.

The `metadata` signature takes no input, which TF Serving's REST API cannot
express (it builds requests from the signature's inputs), so `metadata()` is
gRPC only; the same values are in the model's
`assets.extra/smoothing_metadata.json`.

Neither client trusts the server: each answer is checked against its
signature's contract (`check_answer`: one row per image, the outputs' dtypes,
classes of the model or -1, radii finite, >= 0 and 0 on abstain, bounds in
[0, 1], `certified` and `samples` consistent with the rest) before it is
returned, and a violation raises `ContractError`, whose one-line message
names the output. The gRPC client checks against the metadata of the version
that answered; the REST client against the `Contract` it is given:

    contract = Contract.from_metadata(export.read_metadata(export_dir))
    client = RestClient("localhost", 8501, "smoothed", contract=contract)
"""

import dataclasses
import http.client
import json
import math
import statistics
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple
import urllib.error
import urllib.request

import numpy as np

from tf_consreg.signatures import CERTIFY_RADIUS_SIGNATURE
from tf_consreg.signatures import INPUT_CONTRACTS
from tf_consreg.signatures import INPUT_KEY
from tf_consreg.signatures import METADATA_SIGNATURE
from tf_consreg.signatures import PREDICT_SIGNATURE
from tf_consreg.signatures import RADIUS_KEY
from tf_consreg.signatures import SERVING_SIGNATURE


class Certificate(NamedTuple):
    """CERTIFY's answer for a batch of images.

    Attributes:
      classes: int64 [N], the smoothed class, -1 when abstaining.
      radii: float32 [N], the certified L2 radius (0 when abstaining).
      p_lower: float32 [N], the Clopper-Pearson lower bound on the
        selected class's probability under noise.
    """

    classes: np.ndarray
    radii: np.ndarray
    p_lower: np.ndarray


class RadiusCertificate(NamedTuple):
    """`certify_radius`'s answer for a batch of images, each asked one radius.

    Attributes:
      classes: int64 [N], the smoothed class, -1 when abstaining.
      certified: bool [N], whether g is certified constant within the radius asked.
      radii: float32 [N], the certified L2 radius at the stage where the
        image stopped (0 when abstaining); a lower bound, smaller than
        `certify`'s for images that stopped early.
      samples: int64 [N], the estimation samples the server drew.
    """

    classes: np.ndarray
    certified: np.ndarray
    radii: np.ndarray
    samples: np.ndarray


class ServingError(RuntimeError):
    """The server could not be reached or refused the request (message says why)."""


class ContractError(ServingError):
    """An answer (or the metadata) breaks its signature's contract; the one-line message names the field."""


# Each signature's outputs and their dtypes, as export.py writes them (its
# module docstring); every output is one value per image.
OUTPUTS = {
    SERVING_SIGNATURE: {"class": np.int64, "radius": np.float32, "p_lower": np.float32},
    CERTIFY_RADIUS_SIGNATURE: {"class": np.int64, "certified": np.bool_, "radius": np.float32,
                               "samples": np.int64},
    PREDICT_SIGNATURE: {"class": np.int64, "samples": np.int64},
}
# Outputs checked when a signature has them, though it need not.
OPTIONAL_OUTPUTS = {"p_upper": np.float32}

_INT64_RANGE = (-(2 ** 63), 2 ** 63)
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# The spacing of float32 numbers in [1/2, 1), where every certified p_lower lies.
_FLOAT32_SPACING_NEAR_ONE = 2.0 ** -24


@dataclasses.dataclass(frozen=True)
class Contract:
    """What a client knows of the served model, against which each answer is checked.

    Whatever is None is not checked; the checks that need nothing of the
    model (one row per image, dtypes, class >= -1, radius finite and >= 0
    and 0 on abstain, p_lower in [0, 1], ...) always run.

    Attributes:
      num_classes: the model's classes: a class must lie in [-1, num_classes).
      stages: the staged signatures' cumulative sample counts: `samples` must
        be one of them, and PREDICT abstains only at the last.
      sigma: the noise level: CERTIFY's radius must not exceed
        sigma * Phi^-1(p_lower).
      noise: the export's noise mode, "float" or "grid" (`INPUT_CONTRACTS`);
        a grid export takes only images on the 8-bit grid, which the
        clients check before sending (`check_images`).
    """

    num_classes: Optional[int] = None
    stages: Optional[Tuple[int, ...]] = None
    sigma: Optional[float] = None
    noise: Optional[str] = None

    def __post_init__(self):
        where = "the model's metadata"
        if self.num_classes is not None and not (_is_int(self.num_classes) and self.num_classes >= 2):
            raise ContractError(f"{where}: num_classes = {self.num_classes!r} is not an integer >= 2")
        if self.stages is not None:
            stages = tuple(self.stages)
            if not (stages and all(_is_int(s) and s >= 1 for s in stages)
                    and all(a < b for a, b in zip(stages, stages[1:]))):
                raise ContractError(f"{where}: stages = {list(stages)!r} is not an increasing list of integers >= 1")
            object.__setattr__(self, "stages", stages)
        if self.sigma is not None and not (_is_number(self.sigma) and math.isfinite(self.sigma) and self.sigma > 0):
            raise ContractError(f"{where}: sigma = {self.sigma!r} is not a finite number > 0")
        if self.noise is not None and self.noise not in INPUT_CONTRACTS:
            raise ContractError(f"{where}: noise = {self.noise!r} is not one of {', '.join(INPUT_CONTRACTS)}")

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> "Contract":
        """The contract stated by an export's metadata (the `metadata` signature or its JSON file).

        Raises:
          ContractError: the metadata lacks num_classes, stages or sigma, or one is invalid.
        """
        if not isinstance(metadata, Mapping):
            raise ContractError(f"the model's metadata is a {type(metadata).__name__}, not a mapping")
        missing = [key for key in ("num_classes", "stages", "sigma") if key not in metadata]
        if missing:
            raise ContractError(f"the model's metadata lacks {', '.join(missing)}; is it an export of "
                                "tf_consreg's export_smoothed (bin/export.py)?")
        stages = metadata["stages"]
        # An export written before grid noise records no mode: it samples float noise.
        return cls(num_classes=metadata["num_classes"], sigma=metadata["sigma"],
                   stages=tuple(stages) if isinstance(stages, (list, tuple)) else stages,
                   noise=metadata.get("noise", "float"))


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _first(bad: np.ndarray) -> int:
    return int(np.flatnonzero(bad)[0])


def _column(name: str, value, dtype, num_images: int) -> np.ndarray:
    """One output as an array of `dtype` [num_images]: a JSON list (REST) or a decoded tensor (gRPC).

    JSON values must be of the output's kind (true/false, integers, numbers);
    a tensor must have the output's dtype. Floats are returned as float64
    so that a value float32 cannot hold is reported as sent.

    Raises:
      ContractError: naming `name` and what is wrong.
    """
    expected = f"{np.dtype(dtype).name} [{num_images}] (one per image)"
    if isinstance(value, np.ndarray):
        if value.dtype != dtype:
            raise ContractError(f"{name} is {value.dtype.name} {list(value.shape)}, expected {expected}")
        if value.shape != (num_images,):
            raise ContractError(f"{name} has shape {list(value.shape)}, expected {expected}")
        return value.astype(np.float64) if dtype == np.float32 else value
    if not isinstance(value, list):
        raise ContractError(f"{name} is a JSON {type(value).__name__}, expected a list of {expected}")
    if len(value) != num_images:
        raise ContractError(f"{name} has {len(value)} rows for {num_images} images")
    def is_int64(v):
        return isinstance(v, int) and not isinstance(v, bool) and _INT64_RANGE[0] <= v < _INT64_RANGE[1]

    if dtype == np.bool_:
        ok = [isinstance(v, bool) for v in value]
    elif dtype == np.int64:
        ok = [is_int64(v) for v in value]
    else:  # An integer written without a decimal point is a number too (one float64 can hold).
        ok = [isinstance(v, float) or is_int64(v) for v in value]
    if not all(ok):
        row = ok.index(False)
        shown = json.dumps(value[row])
        shown = shown if len(shown) <= 40 else shown[:37] + "..."  # The line stays short, whatever was sent.
        raise ContractError(f"{name}[{row}] = {shown} is not {np.dtype(dtype).name}")
    return np.array(value, np.float64 if dtype == np.float32 else dtype)


def _require(ok: np.ndarray, name: str, column: np.ndarray, why: str) -> None:
    """Raises ContractError for the first row where `ok` is false: `name[row] = value <why>`."""
    ok = np.asarray(ok, bool)
    if not ok.all():
        row = _first(~ok)
        raise ContractError(f"{name}[{row}] = {_shown(column[row])} {why}")


def _shown(value) -> str:
    """A value as short as its dtype allows (float32 0.33 as 0.33, not 0.33000001311302185)."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return str(value)


def _max_radius(p_lower: np.ndarray, sigma: float) -> np.ndarray:
    """The largest radius a server can derive from float32 `p_lower`: sigma Phi^-1(p), p just above p_lower.

    The server computes radius = float32(sigma Phi^-1(p)) from a float64 p
    that float32 rounded to p_lower, so p <= p_lower + half a float32
    spacing (2^-25 in [1/2, 1)). A whole spacing (2^-24) leaves room for the
    error of Phi^-1 (~1e-15 relative here and in TensorFlow), and the factor
    1 + 2^-23 for rounding the radius to float32 (half a spacing, 2^-24
    relative). With p + 2^-24 >= 1 nothing bounds the radius.
    """
    inverse = statistics.NormalDist().inv_cdf
    bound = np.full(p_lower.shape, np.inf)
    for i, p in enumerate(p_lower):
        p = float(p) + _FLOAT32_SPACING_NEAR_ONE
        if p < 1.0:
            bound[i] = max(0.0, sigma * inverse(p) * (1.0 + 2.0 ** -23))
    return bound


def check_answer(signature: str, outputs, num_images: int, contract: Contract = Contract(),
                 radius: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Checks one answer against its signature's contract; returns its outputs as arrays.

    The checks (each failure names the output and the first bad row):
    every output of the signature is there, one value per image, of its
    dtype; class in [-1, num_classes); radius finite, >= 0, 0 on abstain;
    p_lower (and p_upper, if sent) in [0, 1]. CERTIFY certifies exactly when
    p_lower >= 1/2 and its radius is at most sigma Phi^-1(p_lower);
    `certify_radius` certifies exactly the images whose radius reaches the
    one asked (never an abstention); `samples` is one of the stages, and
    PREDICT abstains only after the last.

    Args:
      signature: the signature that answered (a key of `OUTPUTS`).
      outputs: the answer's outputs: name -> JSON list (REST) or ndarray (gRPC).
      num_images: images in the request.
      contract: what is known of the model.
      radius: float32 [num_images], the radii asked (certify_radius only).

    Returns:
      Output name -> array of its dtype [num_images]; outputs that are not
      part of the contract are left out.

    Raises:
      ContractError: the answer breaks the contract.
    """
    wanted = OUTPUTS[signature]
    if signature == CERTIFY_RADIUS_SIGNATURE and radius is None:
        raise ValueError("check_answer: a certify_radius answer is checked against the radii asked; pass radius")
    names = ", ".join(wanted)
    if not isinstance(outputs, Mapping):
        raise ContractError(f"the outputs are a {type(outputs).__name__}, expected an object with {names}")
    missing = [name for name in wanted if name not in outputs]
    if missing:
        raise ContractError(f"the outputs lack {', '.join(missing)} (expected {names}; got "
                            f"{', '.join(map(str, outputs)) or 'none'})")
    dtypes = {**wanted, **{k: v for k, v in OPTIONAL_OUTPUTS.items() if k in outputs}}
    columns = {name: _column(name, outputs[name], dtype, num_images) for name, dtype in dtypes.items()}

    # Values first, as sent (a JSON float as parsed, before float32 could turn 1e300 into inf).
    classes = columns["class"]
    if contract.num_classes is None:
        _require(classes >= -1, "class", classes, "is neither a class nor -1 (abstain)")
    else:
        _require((classes >= -1) & (classes < contract.num_classes), "class", classes,
                 f"is not a class of {contract.num_classes} (0 to {contract.num_classes - 1}) nor -1 (abstain)")
    for name in ("p_lower", "p_upper"):
        if name in columns:
            _require((columns[name] >= 0) & (columns[name] <= 1), name, columns[name],
                     "is not a probability in [0, 1]")
    if "radius" in columns:
        _require(np.isfinite(columns["radius"]) & (columns["radius"] >= 0), "radius", columns["radius"],
                 "is not a finite radius >= 0")
        _require(columns["radius"] <= _FLOAT32_MAX, "radius", columns["radius"], "overflows float32")
    if "samples" in columns:
        _require(columns["samples"] >= 1, "samples", columns["samples"], "is not a sample count >= 1")

    # Then how they agree, on the values the client returns (a JSON float is the decimal of a float32).
    columns = {name: column.astype(dtypes[name]) for name, column in columns.items()}
    classes = columns["class"]
    abstains = classes == -1
    if "radius" in columns:
        radii = columns["radius"]
        _require(~abstains | (radii == 0), "radius", radii, "is not 0 though class is -1 (abstain)")
    if "p_upper" in columns and "p_lower" in columns:
        _require(columns["p_upper"] >= columns["p_lower"], "p_upper", columns["p_upper"], "is below p_lower")
    if signature == SERVING_SIGNATURE:
        p_lower = columns["p_lower"]
        # CERTIFY certifies exactly when its float64 p_lower is >= 1/2; rounding to float32 keeps that
        # order (1/2 is a float32), except that a p_lower just below 1/2 may round up to 1/2.
        _require(abstains | (p_lower >= 0.5), "p_lower", p_lower, "is below 1/2 though a class is certified")
        _require(~abstains | (p_lower <= 0.5), "p_lower", p_lower, "is above 1/2 though class is -1 (abstain)")
        if contract.sigma is not None:
            _require(radii <= _max_radius(p_lower, contract.sigma), "radius", radii,
                     f"exceeds sigma * Phi^-1(p_lower) (sigma = {contract.sigma:g} from the metadata)")
    if signature == CERTIFY_RADIUS_SIGNATURE:
        certified = columns["certified"]
        asked = np.asarray(radius, np.float32)
        _require(~(certified & abstains), "certified", certified, "though class is -1 (abstain)")
        # Certified at r exactly when the float64 radius is >= r; rounding it to float32 keeps that order
        # (r is a float32), except that a radius just below r may round up to r.
        _require(~certified | (radii >= asked), "certified", certified, "though radius is below the radius asked")
        _require(certified | (radii <= asked), "certified", certified,
                 "though radius is above the radius asked")
    if "samples" in columns and contract.stages is not None:
        samples = columns["samples"]
        _require(np.isin(samples, contract.stages), "samples", samples,
                 f"is not one of the stages {list(contract.stages)}")
        if signature == PREDICT_SIGNATURE:
            _require(~abstains | (samples == contract.stages[-1]), "samples", samples,
                     f"is not the last stage {contract.stages[-1]} though PREDICT abstained")
    return columns


# The 256 values a grid export takes, each one correctly rounded float32
# division k / 255, as the data pipeline and the export's check compute them.
_GRID_VALUES = np.arange(256, dtype=np.float32) / np.float32(255)


def check_images(images, contract: Contract = Contract()) -> np.ndarray:
    """The request's images as float32 [N, H, W, C], refused before sending if a grid export would refuse them.

    A grid export (`contract.noise == "grid"`) takes only the 256 values
    float32(k) / 255, k in [0, 255] (`signatures.INPUT_CONTRACTS`), with no
    tolerance: the server refuses anything else, and so does the client,
    naming the same first bad pixel, without a round trip. A float export's
    range check ([0, 1]) is left to the server, which names the first bad
    pixel itself.

    Args:
      images: the batch, anything numpy turns into float32 [N, H, W, C].
      contract: what is known of the model (its `noise`).

    Returns:
      float32 [N, H, W, C].

    Raises:
      ValueError: not a batch of 4-D images, or (grid) a pixel off the grid;
        the message names the first bad pixel by index and value.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be a batch [N, H, W, C], got shape {images.shape}")
    if contract.noise == "grid":
        in_range = (images >= 0) & (images <= 1)  # False for NaN.
        levels = np.rint(np.where(in_range, images, 0).astype(np.float64) * 255).astype(np.int64)
        off_grid = ~in_range | (images != _GRID_VALUES[levels])
        if off_grid.any():
            index = np.argwhere(off_grid)[0]
            raise ValueError(f"images{index.tolist()} = {float(images[tuple(index)])!r} is not on the 8-bit grid "
                             f"that this export takes ({INPUT_CONTRACTS['grid']})")
    return images


def _radius_inputs(images, radius, contract: Contract) -> Dict[str, np.ndarray]:
    """certify_radius's inputs: the images and one radius per image (a scalar is repeated)."""
    images = check_images(images, contract)
    radii = np.broadcast_to(np.asarray(radius, dtype=np.float32), (len(images),)).copy()
    return {INPUT_KEY: images, RADIUS_KEY: radii}


def _radius_certificate(outputs: Dict[str, np.ndarray]) -> RadiusCertificate:
    return RadiusCertificate(classes=outputs["class"], certified=outputs["certified"], radii=outputs["radius"],
                             samples=outputs["samples"])


def _certificate(outputs: Dict[str, np.ndarray]) -> Certificate:
    return Certificate(classes=outputs["class"], radii=outputs["radius"], p_lower=outputs["p_lower"])


def _checked(where: str, signature: str, outputs, inputs: Dict[str, np.ndarray], contract: Contract):
    """`check_answer` for a request's `inputs`, its message prefixed with who answered."""
    try:
        return check_answer(signature, outputs, len(inputs[INPUT_KEY]), contract, radius=inputs.get(RADIUS_KEY))
    except ContractError as e:
        raise ContractError(f"{where}: the {signature} answer breaks its contract: {e}") from None


class RestClient:
    """Calls TF Serving's REST API: `POST /v1/models/<name>[/versions/<v>]:predict`.

    Every answer is checked against its signature's contract (`check_answer`)
    before it is returned. REST cannot call the `metadata` signature, so what
    the checks know of the model comes from `contract`: e.g.
    `Contract.from_metadata(export.read_metadata(export_dir))`, or
    `Contract(num_classes=10)`.

    Args:
      host: server host name.
      port: TF Serving's REST port (`--rest_api_port`, 8501 in the container).
      model_name: the model's name in TF Serving (`--model_name` or models.config).
      version: a version to pin, or None for the latest.
      timeout: seconds to wait for one request.
      contract: what is known of the served model (default: nothing).
    """

    def __init__(self, host: str = "localhost", port: int = 8501, model_name: str = "smoothed", *,
                 version: Optional[int] = None, timeout: float = 300.0, contract: Contract = Contract()):
        path = f"/v1/models/{model_name}" + (f"/versions/{int(version)}" if version is not None else "")
        self.url = f"http://{host}:{int(port)}{path}:predict"
        self.timeout = timeout
        self.contract = contract

    def _predict(self, signature: str, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        # Columnar ("inputs") format: outputs come back as whole tensors.
        body = json.dumps({"signature_name": signature,
                           "inputs": {key: value.tolist() for key, value in inputs.items()}}).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"},
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                text = response.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")
            try:
                error = json.loads(detail)
            except ValueError:
                error = None
            if isinstance(error, dict) and "error" in error:
                detail = str(error["error"])
            raise ServingError(f"{self.url}: HTTP {e.code}: {detail}") from e
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            raise ServingError(f"cannot reach {self.url}: {getattr(e, 'reason', e)}") from e
        try:
            payload = json.loads(text)
        except ValueError:  # UnicodeDecodeError included.
            raise ContractError(f"{self.url}: the {signature} answer is not JSON: "
                                f"{text[:80].decode('utf-8', 'replace')!r}") from None
        if not isinstance(payload, dict) or "outputs" not in payload:
            raise ContractError(f"{self.url}: the {signature} answer has no 'outputs': {str(payload)[:200]}")
        return _checked(self.url, signature, payload["outputs"], inputs, self.contract)

    def _known_contract(self) -> Contract:
        """The contract the images are checked against before sending (`check_images`)."""
        return self.contract

    def certify(self, images) -> Certificate:
        """CERTIFY (`serving_default`) for a batch of images float32 [N, H, W, C] in [0, 1]."""
        images = check_images(images, self._known_contract())
        return _certificate(self._predict(SERVING_SIGNATURE, {INPUT_KEY: images}))

    def certify_radius(self, images, radius) -> RadiusCertificate:
        """`certify_radius` for a batch of images and a radius (one per image, or one for all)."""
        inputs = _radius_inputs(images, radius, self._known_contract())
        return _radius_certificate(self._predict(CERTIFY_RADIUS_SIGNATURE, inputs))

    def predict(self, images) -> np.ndarray:
        """PREDICT (`predict` signature): int64 [N] classes, -1 = abstain."""
        images = check_images(images, self._known_contract())
        return self._predict(PREDICT_SIGNATURE, {INPUT_KEY: images})["class"]


class GrpcClient:
    """Calls TF Serving's gRPC `PredictionService.Predict`.

    Every answer is checked against its signature's contract (`check_answer`)
    before it is returned, with what the `metadata` signature of the version
    that answered says of the model (fetched once per version), unless
    `contract` is given.

    Args:
      target: `host:port` of TF Serving's gRPC port (`--port`, 8500 in the container).
      model_name: the model's name in TF Serving.
      version: a version to pin, or None for the latest.
      timeout: seconds to wait for one request.
      contract: what is known of the served model; None: its metadata.
    """

    def __init__(self, target: str = "localhost:8500", model_name: str = "smoothed", *,
                 version: Optional[int] = None, timeout: float = 300.0, contract: Optional[Contract] = None):
        import grpc  # pylint: disable=import-outside-toplevel
        from tensorflow_serving.apis import prediction_service_pb2_grpc  # pylint: disable=import-outside-toplevel

        self.target = target
        self.model_name = model_name
        self.version = version
        self.timeout = timeout
        self.contract = contract
        self._contracts: Dict[Optional[int], Contract] = {}  # answering version -> its metadata's contract
        self._grpc = grpc
        # Images of a large batch exceed gRPC's default 4 MB message limit.
        self._channel = grpc.insecure_channel(
            target, options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    def _call(self, signature: str, inputs: Dict[str, np.ndarray],
              version: Optional[int]) -> Tuple[Dict[str, np.ndarray], Optional[int]]:
        """One Predict call: (the outputs decoded, the version that answered, if the server says)."""
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        from tensorflow_serving.apis import predict_pb2  # pylint: disable=import-outside-toplevel

        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = signature
        if version is not None:
            request.model_spec.version.value = int(version)
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        try:
            response = self._stub.Predict(request, timeout=self.timeout)
        except self._grpc.RpcError as e:
            raise ServingError(f"{self.target}: {e.code().name}: {e.details()}") from e
        try:
            outputs = {key: tf.make_ndarray(value) for key, value in response.outputs.items()}
        except (TypeError, ValueError) as e:  # A tensor whose content does not match its dtype and shape.
            raise ContractError(f"{self.target}: the {signature} answer holds a malformed tensor: {e}") from None
        answered = response.model_spec.version.value if response.model_spec.HasField("version") else version
        return outputs, answered

    def _contract(self, version: Optional[int]) -> Contract:
        if self.contract is not None:
            return self.contract
        if version not in self._contracts:
            self._contracts[version] = Contract.from_metadata(self._metadata(version))
        return self._contracts[version]

    def _predict(self, signature: str, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        outputs, answered = self._call(signature, inputs, self.version)
        try:
            contract = self._contract(answered)
        except ContractError as e:
            raise ContractError(f"{self.target}: {e}") from None
        return _checked(self.target, signature, outputs, inputs, contract)

    def _known_contract(self) -> Contract:
        """The contract the images are checked against before sending (`check_images`).

        The one given, or the pinned version's metadata once fetched. The
        server checks every request anyway; this only spares a round trip.
        """
        if self.contract is not None:
            return self.contract
        return self._contracts.get(self.version, Contract())

    def certify(self, images) -> Certificate:
        """CERTIFY (`serving_default`) for a batch of images float32 [N, H, W, C] in [0, 1]."""
        images = check_images(images, self._known_contract())
        return _certificate(self._predict(SERVING_SIGNATURE, {INPUT_KEY: images}))

    def certify_radius(self, images, radius) -> RadiusCertificate:
        """`certify_radius` for a batch of images and a radius (one per image, or one for all)."""
        inputs = _radius_inputs(images, radius, self._known_contract())
        return _radius_certificate(self._predict(CERTIFY_RADIUS_SIGNATURE, inputs))

    def predict(self, images) -> np.ndarray:
        """PREDICT (`predict` signature): int64 [N] classes, -1 = abstain."""
        images = check_images(images, self._known_contract())
        return self._predict(PREDICT_SIGNATURE, {INPUT_KEY: images})["class"]

    def _metadata(self, version: Optional[int]) -> dict:
        values = {}
        for key, value in self._call(METADATA_SIGNATURE, {}, version)[0].items():
            value = value.tolist()
            if isinstance(value, bytes):
                value = value.decode()
            elif isinstance(value, list):
                value = [v.decode() if isinstance(v, bytes) else v for v in value]
            values[key] = value
        return values

    def metadata(self) -> dict:
        """The `metadata` signature as plain Python values (sigma, n0, n, alpha, class_names, ...)."""
        return self._metadata(self.version)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "GrpcClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
