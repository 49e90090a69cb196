"""Tests for tf_consreg.serving_client against loopback stand-ins for TF Serving.

TF Serving cannot be installed here, so each test class starts a server on
127.0.0.1 (port 0) that answers the way TF Serving does - REST columnar
`:predict` requests and gRPC `PredictionService.Predict` - by running the
exported SavedModel's signatures. Servers are bounded by timeouts and always
shut down.
"""

from concurrent import futures
import http.server
import json
import os
import re
import socket
import tempfile
import threading

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from export_test import export_flat  # tests/ is on sys.path under pytest
from export_test import images_at_margins
from export_test import linear_model
from tf_consreg import export
from tf_consreg import serving_client
from tf_consreg import signatures

_MODEL_NAME = "smoothed"
_TIMEOUT = 60.0


def _run_signature(loaded, signature, inputs):
    """Runs a signature like TF Serving: returns ({name: ndarray}, None) or (None, (code, message))."""
    if signature not in loaded.signatures:
        return None, (404, f"Serving signature name: \"{signature}\" not found in signature def")
    try:
        outputs = loaded.signatures[signature](**{k: tf.constant(v) for k, v in inputs.items()})
    except (tf.errors.InvalidArgumentError, TypeError, ValueError) as e:
        return None, (400, getattr(e, "message", str(e)))
    return {k: v.numpy() for k, v in outputs.items()}, None


def _json_value(array: np.ndarray):
    if array.dtype == object:
        return np.vectorize(lambda b: b.decode())(array).tolist()
    return array.tolist()


class _RestHandler(http.server.BaseHTTPRequestHandler):
    """TF Serving's REST predict API, columnar ("inputs") format."""

    loaded = None
    PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(/versions/(?P<version>\d+))?:predict$")

    def log_message(self, *args):  # keep test output clean
        pass

    def _reply(self, code, payload):
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # pylint: disable=invalid-name
        match = self.PATH.match(self.path)
        if not match:
            return self._reply(404, {"error": f"Malformed request: POST {self.path}"})
        if match["name"] != _MODEL_NAME:
            return self._reply(404, {"error": f"Servable not found for request: Latest({match['name']})"})
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if "inputs" not in request:
            return self._reply(400, {"error": "Missing 'inputs' or 'instances' key"})
        inputs = request["inputs"]
        if not isinstance(inputs, dict):
            inputs = {signatures.INPUT_KEY: inputs}
        inputs = {k: np.asarray(v, np.float32) for k, v in inputs.items()}
        outputs, error = _run_signature(self.loaded, request.get("signature_name", "serving_default"), inputs)
        if error:
            return self._reply(error[0], {"error": error[1]})
        if len(outputs) == 1:  # TF Serving unwraps a single output.
            return self._reply(200, {"outputs": _json_value(next(iter(outputs.values())))})
        return self._reply(200, {"outputs": {k: _json_value(v) for k, v in outputs.items()}})


class _PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """TF Serving's gRPC Predict."""

    def __init__(self, loaded):
        self.loaded = loaded

    def Predict(self, request, context):  # pylint: disable=invalid-name
        if request.model_spec.name != _MODEL_NAME:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"Servable not found for request: Latest({request.model_spec.name})")
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        outputs, error = _run_signature(self.loaded, request.model_spec.signature_name or "serving_default", inputs)
        if error:
            code = grpc.StatusCode.NOT_FOUND if error[0] == 404 else grpc.StatusCode.INVALID_ARGUMENT
            context.abort(code, error[1])
        response = predict_pb2.PredictResponse()
        response.model_spec.CopyFrom(request.model_spec)
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response


class _ExportFixture:
    """Mixin: a fixed-seed export of a linear model and its direct answers, shared per class."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls._tmp = tempfile.TemporaryDirectory()
        rng = np.random.default_rng(0)
        w = rng.normal(size=(4, 4, 1)) * 0.25
        b = -float(np.sum(w)) * 0.5
        cls.export_dir = os.path.join(cls._tmp.name, "1")
        # A fixed seed makes every request deterministic, so the clients' answers
        # must equal the signature's answers exactly.
        export_flat(linear_model(w, b), cls.export_dir, sigma=0.25, num_classes=2, n0=20, n=400,
                    alpha=0.001, batch_size=400, class_names=("pos", "neg"), seed=11)
        cls.loaded = tf.saved_model.load(cls.export_dir)
        cls.images = images_at_margins(w, b, 0.25 * np.array([1.5, -1.0, 0.0, 0.3]), rng)
        cls.expected = {k: v.numpy() for k, v in cls.loaded.signatures["serving_default"](
            images=tf.constant(cls.images)).items()}
        cls.expected_predict = cls.loaded.signatures["predict"](images=tf.constant(cls.images))["class"].numpy()
        cls.radii = np.array([0.2, 0.1, 0.1, 0.05], np.float32)
        cls.expected_radius = {k: v.numpy() for k, v in cls.loaded.signatures["certify_radius"](
            images=tf.constant(cls.images), radius=tf.constant(cls.radii)).items()}

    def assert_radius_answers(self, answer, expected):
        self.assertIsInstance(answer, serving_client.RadiusCertificate)
        np.testing.assert_array_equal(answer.classes, expected["class"])
        np.testing.assert_array_equal(answer.certified, expected["certified"])
        np.testing.assert_array_equal(answer.radii, expected["radius"])
        np.testing.assert_array_equal(answer.samples, expected["samples"])
        self.assertEqual((answer.classes.dtype, answer.certified.dtype, answer.radii.dtype, answer.samples.dtype),
                         (np.int64, np.bool_, np.float32, np.int64))

    @classmethod
    def tearDownClass(cls):
        cls._tmp.cleanup()
        super().tearDownClass()


class RestClientTest(_ExportFixture, tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        handler = type("Handler", (_RestHandler,), {"loaded": cls.loaded})
        cls.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        cls.server.timeout = _TIMEOUT
        cls.thread = threading.Thread(target=cls.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        cls.thread.start()
        cls.port = cls.server.server_address[1]

    @classmethod
    def tearDownClass(cls):
        cls.server.shutdown()
        cls.server.server_close()
        cls.thread.join(timeout=10)
        super().tearDownClass()

    def _client(self, **kwargs):
        return serving_client.RestClient("127.0.0.1", self.port, kwargs.pop("model_name", _MODEL_NAME),
                                         timeout=_TIMEOUT, **kwargs)

    def test_certify_returns_the_signature_answers(self):
        certificate = self._client().certify(self.images)
        self.assertIsInstance(certificate, serving_client.Certificate)
        np.testing.assert_array_equal(certificate.classes, self.expected["class"])
        np.testing.assert_array_equal(certificate.radii, self.expected["radius"])
        np.testing.assert_array_equal(certificate.p_lower, self.expected["p_lower"])
        self.assertEqual(certificate.classes.dtype, np.int64)
        self.assertEqual(certificate.radii.dtype, np.float32)
        classes, radii, _ = certificate  # unpacks like a tuple
        self.assertEqual(classes.shape, radii.shape)

    def test_predict_returns_the_signature_answers(self):
        np.testing.assert_array_equal(self._client().predict(self.images), self.expected_predict)

    def test_certify_radius_returns_the_signature_answers(self):
        self.assert_radius_answers(self._client().certify_radius(self.images, self.radii), self.expected_radius)
        # One radius for all images: the signature's answer at that radius for each.
        one = {k: v.numpy() for k, v in self.loaded.signatures["certify_radius"](
            images=tf.constant(self.images), radius=tf.fill([len(self.images)], 0.1)).items()}
        self.assert_radius_answers(self._client().certify_radius(self.images, 0.1), one)
        with self.assertRaisesRegex(serving_client.ServingError, r"(?s)HTTP 400: .*radius must be finite and > 0"):
            self._client().certify_radius(self.images, 0.0)

    def test_version_in_url(self):
        client = self._client(version=1)
        self.assertTrue(client.url.endswith("/v1/models/smoothed/versions/1:predict"), client.url)
        np.testing.assert_array_equal(client.certify(self.images).classes, self.expected["class"])

    def test_bad_request_reports_the_server_message(self):
        with self.assertRaisesRegex(serving_client.ServingError, r"(?s)HTTP 400: .*images must be in \[0, 1\]"):
            self._client().certify(self.images + 2.0)
        with self.assertRaisesRegex(serving_client.ServingError, r"(?s)HTTP 400: .*images must be float32 \[batch, 4"):
            self._client().certify(np.zeros((1, 5, 5, 1), np.float32))

    def test_unknown_model_and_unreachable_server(self):
        with self.assertRaisesRegex(serving_client.ServingError, "HTTP 404: Servable not found"):
            self._client(model_name="other").certify(self.images)
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            free_port = s.getsockname()[1]
        with self.assertRaisesRegex(serving_client.ServingError, "cannot reach"):
            serving_client.RestClient("127.0.0.1", free_port, _MODEL_NAME, timeout=5).certify(self.images)

    def test_images_must_be_a_batch(self):
        with self.assertRaisesRegex(ValueError, r"batch \[N, H, W, C\]"):
            self._client().certify(self.images[0])


class GrpcClientTest(_ExportFixture, tf.test.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(_PredictionService(cls.loaded), cls.server)
        cls.port = cls.server.add_insecure_port("127.0.0.1:0")
        cls.server.start()

    @classmethod
    def tearDownClass(cls):
        cls.server.stop(grace=None).wait(timeout=10)
        super().tearDownClass()

    def _client(self, model_name=_MODEL_NAME):
        return serving_client.GrpcClient(f"127.0.0.1:{self.port}", model_name, timeout=_TIMEOUT)

    def test_certify_predict_and_metadata(self):
        with self._client() as client:
            certificate = client.certify(self.images)
            np.testing.assert_array_equal(certificate.classes, self.expected["class"])
            np.testing.assert_array_equal(certificate.radii, self.expected["radius"])
            np.testing.assert_array_equal(certificate.p_lower, self.expected["p_lower"])
            np.testing.assert_array_equal(client.predict(self.images), self.expected_predict)
            self.assert_radius_answers(client.certify_radius(self.images, self.radii), self.expected_radius)
            meta = client.metadata()
        self.assertEqual(meta, export.read_metadata(self.export_dir))
        self.assertEqual(meta["class_names"], ["pos", "neg"])

    def test_errors_carry_the_status_and_message(self):
        with self._client() as client:
            with self.assertRaisesRegex(serving_client.ServingError, "(?s)INVALID_ARGUMENT: .*images must be finite"):
                client.certify(np.full((1, 4, 4, 1), np.nan, np.float32))
        with self._client("other") as client:
            with self.assertRaisesRegex(serving_client.ServingError, "NOT_FOUND"):
                client.predict(self.images)


if __name__ == "__main__":
    tf.test.main()
