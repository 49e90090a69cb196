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
"""

import json
from typing import Dict, NamedTuple, Optional
import urllib.error
import urllib.request

import numpy as np

from tf_consreg.signatures import CERTIFY_RADIUS_SIGNATURE
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


def _as_images(images) -> np.ndarray:
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be a batch [N, H, W, C], got shape {images.shape}")
    return images


def _radius_inputs(images, radius) -> Dict[str, np.ndarray]:
    """certify_radius's inputs: the images and one radius per image (a scalar is repeated)."""
    images = _as_images(images)
    radii = np.broadcast_to(np.asarray(radius, dtype=np.float32), (len(images),)).copy()
    return {INPUT_KEY: images, RADIUS_KEY: radii}


def _radius_certificate(outputs: Dict[str, np.ndarray]) -> RadiusCertificate:
    return RadiusCertificate(
        classes=np.asarray(outputs["class"], dtype=np.int64),
        certified=np.asarray(outputs["certified"], dtype=bool),
        radii=np.asarray(outputs["radius"], dtype=np.float32),
        samples=np.asarray(outputs["samples"], dtype=np.int64),
    )


def _certificate(outputs: Dict[str, np.ndarray]) -> Certificate:
    return Certificate(
        classes=np.asarray(outputs["class"], dtype=np.int64),
        radii=np.asarray(outputs["radius"], dtype=np.float32),
        p_lower=np.asarray(outputs["p_lower"], dtype=np.float32),
    )


class RestClient:
    """Calls TF Serving's REST API: `POST /v1/models/<name>[/versions/<v>]:predict`.

    Args:
      host: server host name.
      port: TF Serving's REST port (`--rest_api_port`, 8501 in the container).
      model_name: the model's name in TF Serving (`--model_name` or models.config).
      version: a version to pin, or None for the latest.
      timeout: seconds to wait for one request.
    """

    def __init__(self, host: str = "localhost", port: int = 8501, model_name: str = "smoothed", *,
                 version: Optional[int] = None, timeout: float = 300.0):
        path = f"/v1/models/{model_name}" + (f"/versions/{int(version)}" if version is not None else "")
        self.url = f"http://{host}:{int(port)}{path}:predict"
        self.timeout = timeout

    def _predict(self, signature: str, inputs: Dict[str, np.ndarray]) -> dict:
        # Columnar ("inputs") format: outputs come back as whole tensors.
        body = json.dumps({"signature_name": signature,
                           "inputs": {key: value.tolist() for key, value in inputs.items()}}).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"},
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = json.load(response)
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")
            try:
                detail = json.loads(detail).get("error", detail)
            except ValueError:
                pass
            raise ServingError(f"{self.url}: HTTP {e.code}: {detail}") from e
        except (urllib.error.URLError, OSError) as e:
            raise ServingError(f"cannot reach {self.url}: {getattr(e, 'reason', e)}") from e
        outputs = payload.get("outputs")
        if outputs is None:
            raise ServingError(f"{self.url}: response without 'outputs': {str(payload)[:200]}")
        return outputs

    def certify(self, images) -> Certificate:
        """CERTIFY (`serving_default`) for a batch of images float32 [N, H, W, C] in [0, 1]."""
        return _certificate(self._predict(SERVING_SIGNATURE, {INPUT_KEY: _as_images(images)}))

    def certify_radius(self, images, radius) -> RadiusCertificate:
        """`certify_radius` for a batch of images and a radius (one per image, or one for all)."""
        return _radius_certificate(self._predict(CERTIFY_RADIUS_SIGNATURE, _radius_inputs(images, radius)))

    def predict(self, images) -> np.ndarray:
        """PREDICT (`predict` signature): int64 [N] classes, -1 = abstain."""
        outputs = self._predict(PREDICT_SIGNATURE, {INPUT_KEY: _as_images(images)})
        # TF Serving returns a single output's tensor itself, not a {name: tensor} map.
        return np.asarray(outputs["class"] if isinstance(outputs, dict) else outputs, dtype=np.int64)


class GrpcClient:
    """Calls TF Serving's gRPC `PredictionService.Predict`.

    Args:
      target: `host:port` of TF Serving's gRPC port (`--port`, 8500 in the container).
      model_name: the model's name in TF Serving.
      version: a version to pin, or None for the latest.
      timeout: seconds to wait for one request.
    """

    def __init__(self, target: str = "localhost:8500", model_name: str = "smoothed", *,
                 version: Optional[int] = None, timeout: float = 300.0):
        import grpc  # pylint: disable=import-outside-toplevel
        from tensorflow_serving.apis import prediction_service_pb2_grpc  # pylint: disable=import-outside-toplevel

        self.target = target
        self.model_name = model_name
        self.version = version
        self.timeout = timeout
        self._grpc = grpc
        # Images of a large batch exceed gRPC's default 4 MB message limit.
        self._channel = grpc.insecure_channel(
            target, options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    def _predict(self, signature: str, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        from tensorflow_serving.apis import predict_pb2  # pylint: disable=import-outside-toplevel

        request = predict_pb2.PredictRequest()
        request.model_spec.name = self.model_name
        request.model_spec.signature_name = signature
        if self.version is not None:
            request.model_spec.version.value = int(self.version)
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        try:
            response = self._stub.Predict(request, timeout=self.timeout)
        except self._grpc.RpcError as e:
            raise ServingError(f"{self.target}: {e.code().name}: {e.details()}") from e
        return {key: tf.make_ndarray(value) for key, value in response.outputs.items()}

    def certify(self, images) -> Certificate:
        """CERTIFY (`serving_default`) for a batch of images float32 [N, H, W, C] in [0, 1]."""
        return _certificate(self._predict(SERVING_SIGNATURE, {INPUT_KEY: _as_images(images)}))

    def certify_radius(self, images, radius) -> RadiusCertificate:
        """`certify_radius` for a batch of images and a radius (one per image, or one for all)."""
        return _radius_certificate(self._predict(CERTIFY_RADIUS_SIGNATURE, _radius_inputs(images, radius)))

    def predict(self, images) -> np.ndarray:
        """PREDICT (`predict` signature): int64 [N] classes, -1 = abstain."""
        return np.asarray(self._predict(PREDICT_SIGNATURE, {INPUT_KEY: _as_images(images)})["class"],
                          dtype=np.int64)

    def metadata(self) -> dict:
        """The `metadata` signature as plain Python values (sigma, n0, n, alpha, class_names, ...)."""
        values = {}
        for key, value in self._predict(METADATA_SIGNATURE, {}).items():
            value = value.tolist()
            if isinstance(value, bytes):
                value = value.decode()
            elif isinstance(value, list):
                value = [v.decode() if isinstance(v, bytes) else v for v in value]
            values[key] = value
        return values

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "GrpcClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
