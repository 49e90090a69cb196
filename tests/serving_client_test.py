"""Tests for tf_consreg.serving_client against loopback stand-ins for TF Serving.

TF Serving cannot be installed here, so each test class starts a server on
127.0.0.1 (port 0) that answers the way TF Serving does - REST columnar
`:predict` requests and gRPC `PredictionService.Predict` - by running the
exported SavedModel's signatures. Servers are bounded by timeouts and always
shut down.
"""

from concurrent import futures
import copy
import http.server
import json
import os
import re
import socket
import tempfile
import threading

from absl.testing import parameterized
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
# A canned server shuts itself down after this long, should a test never stop it.
_CANNED_LIFETIME = 120.0


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


def _make_shared_export() -> tuple:
    """The fixed-seed export of a linear model and its direct answers; (its TemporaryDirectory, the attributes)."""
    tmp = tempfile.TemporaryDirectory()
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 4, 1)) * 0.25
    b = -float(np.sum(w)) * 0.5
    export_dir = os.path.join(tmp.name, "1")
    # A fixed seed makes every request deterministic, so the clients' answers
    # must equal the signature's answers exactly.
    export_flat(linear_model(w, b), export_dir, sigma=0.25, num_classes=2, n0=20, n=400,
                alpha=0.001, batch_size=400, class_names=("pos", "neg"), seed=11)
    loaded = tf.saved_model.load(export_dir)
    images = images_at_margins(w, b, 0.25 * np.array([1.5, -1.0, 0.0, 0.3]), rng)
    radii = np.array([0.2, 0.1, 0.1, 0.05], np.float32)
    attributes = dict(
        export_dir=export_dir, loaded=loaded, images=images, radii=radii,
        expected={k: v.numpy() for k, v in loaded.signatures["serving_default"](images=tf.constant(images)).items()},
        expected_predict=loaded.signatures["predict"](images=tf.constant(images))["class"].numpy(),
        expected_radius={k: v.numpy() for k, v in loaded.signatures["certify_radius"](
            images=tf.constant(images), radius=tf.constant(radii)).items()})
    return tmp, attributes


class _ExportFixture:
    """Mixin: a fixed-seed export of a linear model and its direct answers.

    Made once for every class that mixes it in, whose settings match (issue
    21); tearDownModule removes it.
    """

    _shared = None  # _make_shared_export()'s answer, once made.

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        if _ExportFixture._shared is None:
            _ExportFixture._shared = _make_shared_export()
        for name, value in _ExportFixture._shared[1].items():
            setattr(cls, name, value)

    def assert_radius_answers(self, answer, expected):
        self.assertIsInstance(answer, serving_client.RadiusCertificate)
        np.testing.assert_array_equal(answer.classes, expected["class"])
        np.testing.assert_array_equal(answer.certified, expected["certified"])
        np.testing.assert_array_equal(answer.radii, expected["radius"])
        np.testing.assert_array_equal(answer.samples, expected["samples"])
        self.assertEqual((answer.classes.dtype, answer.certified.dtype, answer.radii.dtype, answer.samples.dtype),
                         (np.int64, np.bool_, np.float32, np.int64))


def tearDownModule():
    if _ExportFixture._shared is not None:
        _ExportFixture._shared[0].cleanup()
        _ExportFixture._shared = None


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
        # The export's own metadata: its answers must pass every check, sigma's radius bound included.
        contract = serving_client.Contract.from_metadata(export.read_metadata(self.export_dir))
        return serving_client.RestClient("127.0.0.1", self.port, kwargs.pop("model_name", _MODEL_NAME),
                                         timeout=_TIMEOUT, contract=contract, **kwargs)

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

    def test_a_request_over_max_batch_is_refused_in_one_line(self):
        over = np.full((export.DEFAULT_MAX_BATCH + 1, 4, 4, 1), 0.5, np.float32)
        # The client knows the export's max_batch from its metadata: it refuses before sending. The server
        # would answer with its own words (below), so this message, naming the client's reason, is the client's.
        self.assertEqual(self._client().contract.max_batch, export.DEFAULT_MAX_BATCH)
        with self.assertRaisesRegex(serving_client.ServingError,
                                    rf"^http://127.0.0.1:{self.port}/v1/models/smoothed:predict: a request of 65 "
                                    r"images is more than the model's max_batch of 64; split it into requests of at "
                                    r"most 64 images$"):
            self._client().predict(over)
        # A client that does not know it sends the request; the server refuses it, and the one line of its
        # message that says why is kept.
        client = serving_client.RestClient("127.0.0.1", self.port, _MODEL_NAME, timeout=_TIMEOUT,
                                           contract=serving_client.Contract(num_classes=2))
        with self.assertRaisesRegex(serving_client.ServingError,
                                    r"^[^\n]*HTTP 400: assertion failed: \[images must be at most max_batch = 64 per "
                                    r"request \(split a larger request\); got a batch of\] \[65\]$"):
            client.predict(over)


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
            # One line: the server's message says why, then names the node and function.
            with self.assertRaisesRegex(serving_client.ServingError,
                                        r"^[^\n]*INVALID_ARGUMENT: assertion failed: \[images must be at most "
                                        r"max_batch = 64 per request .*\] \[65\]$"):
                client.predict(np.full((65, 4, 4, 1), 0.5, np.float32))
        with self._client("other") as client:
            with self.assertRaisesRegex(serving_client.ServingError, "NOT_FOUND"):
                client.predict(self.images)


# A well-formed answer for 3 images of a 10-class model with sigma = 0.25 and
# stages (100, 1000), the contract below. CERTIFY: radius <= 0.25 Phi^-1(p_lower)
# (0.3 <= 0.3204 at p_lower 0.9; 0.1 <= 0.1311 at 0.7); image 1 abstains.
CONTRACT = serving_client.Contract(num_classes=10, stages=(100, 1000), sigma=0.25)
METADATA = {"num_classes": 10, "stages": [100, 1000], "sigma": 0.25}
GOOD = {
    "serving_default": {"class": [3, -1, 9], "radius": [0.3, 0.0, 0.1], "p_lower": [0.9, 0.4, 0.7]},
    "certify_radius": {"class": [3, -1, 9], "certified": [True, False, False], "radius": [0.3, 0.0, 0.1],
                       "samples": [100, 1000, 1000]},
    "predict": {"class": [3, -1, 0], "samples": [100, 1000, 1000]},
}
# The radius asked of each image in the certify_radius requests.
ASKED = np.float32(0.2)


def _with(signature, **changes):
    outputs = copy.deepcopy(GOOD[signature])
    outputs.update(changes)
    return outputs


def _without(signature, key):
    outputs = copy.deepcopy(GOOD[signature])
    del outputs[key]
    return outputs


# (name, signature, outputs, the error's text after "breaks its contract: ").
MALFORMED = (
    ("class_too_large", "serving_default", _with("serving_default", **{"class": [99, -1, 9]}),
     "class[0] = 99 is not a class of 10 (0 to 9) nor -1 (abstain)"),
    ("class_below_abstain", "serving_default", _with("serving_default", **{"class": [3, -7, 9]}),
     "class[1] = -7 is not a class of 10 (0 to 9) nor -1 (abstain)"),
    ("class_not_integer", "predict", _with("predict", **{"class": [3, 1.5, 0]}), "class[1] = 1.5 is not int64"),
    ("radius_nan", "serving_default", _with("serving_default", radius=[float("nan"), -1.0, 1e300]),
     "radius[0] = nan is not a finite radius >= 0"),
    ("radius_negative", "serving_default", _with("serving_default", radius=[0.3, -1.0, 0.1]),
     "radius[1] = -1.0 is not a finite radius >= 0"),
    ("radius_overflows_float32", "serving_default", _with("serving_default", radius=[0.3, 0.0, 1e300]),
     "radius[2] = 1e+300 overflows float32"),
    ("radius_on_abstain", "serving_default", _with("serving_default", radius=[0.3, 0.5, 0.1]),
     "radius[1] = 0.5 is not 0 though class is -1 (abstain)"),
    ("radius_above_p_lower", "serving_default", _with("serving_default", radius=[0.33, 0.0, 0.1]),
     "radius[0] = 0.33 exceeds sigma * Phi^-1(p_lower) (sigma = 0.25 from the metadata)"),
    ("p_lower_above_one", "serving_default", _with("serving_default", p_lower=[2.0, 0.4, 0.7]),
     "p_lower[0] = 2.0 is not a probability in [0, 1]"),
    ("p_lower_below_half_certified", "serving_default", _with("serving_default", p_lower=[0.9, 0.4, 0.45]),
     "p_lower[2] = 0.45 is below 1/2 though a class is certified"),
    ("p_lower_above_half_abstained", "serving_default", _with("serving_default", p_lower=[0.9, 0.6, 0.7]),
     "p_lower[1] = 0.6 is above 1/2 though class is -1 (abstain)"),
    ("p_upper_below_p_lower", "serving_default", _with("serving_default", p_upper=[0.95, 0.5, 0.6]),
     "p_upper[2] = 0.6 is below p_lower"),
    ("missing_key", "serving_default", _without("serving_default", "p_lower"),
     "the outputs lack p_lower (expected class, radius, p_lower; got class, radius)"),
    ("too_few_rows", "serving_default", _with("serving_default", radius=[0.3, 0.0]),
     "radius has 2 rows for 3 images"),
    ("too_many_rows", "predict", _with("predict", samples=[100, 1000, 1000, 1000]),
     "samples has 4 rows for 3 images"),
    ("outputs_a_list", "predict", [3, -1, 0], "the outputs are a list, expected an object with class, samples"),
    ("radius_a_huge_integer", "serving_default", _with("serving_default", radius=[0.3, 0, 10 ** 400]),
     "radius[2] = 1" + "0" * 36 + "... is not float32"),
    ("column_not_a_list", "serving_default", _with("serving_default", radius=0.3),
     "radius is a JSON float, expected a list of float32 [3] (one per image)"),
    ("certified_below_radius", "certify_radius", _with("certify_radius", certified=[True, False, True]),
     "certified[2] = True though radius is below the radius asked"),
    ("not_certified_above_radius", "certify_radius", _with("certify_radius", certified=[False, False, False]),
     "certified[0] = False though radius is above the radius asked"),
    ("certified_abstention", "certify_radius",
     _with("certify_radius", certified=[True, True, False], radius=[0.3, 0.0, 0.1]),
     "certified[1] = True though class is -1 (abstain)"),
    ("certified_not_bool", "certify_radius", _with("certify_radius", certified=[1, 0, 0]),
     "certified[0] = 1 is not bool"),
    ("samples_not_a_stage", "certify_radius", _with("certify_radius", samples=[100, 1000, 999]),
     "samples[2] = 999 is not one of the stages [100, 1000]"),
    ("samples_zero", "predict", _with("predict", samples=[0, 1000, 1000]), "samples[0] = 0 is not a sample "
     "count >= 1"),
    ("abstained_before_last_stage", "predict", _with("predict", samples=[100, 100, 1000]),
     "samples[1] = 100 is not the last stage 1000 though PREDICT abstained"),
)


def _request(signature, num_images=3):
    inputs = {signatures.INPUT_KEY: np.zeros((num_images, 4, 4, 1), np.float32)}
    if signature == "certify_radius":
        inputs[signatures.RADIUS_KEY] = np.full(num_images, ASKED, np.float32)
    return inputs


class CheckAnswerTest(parameterized.TestCase):
    """check_answer on JSON-decoded answers (REST's form), without a server."""

    @parameterized.parameters("serving_default", "certify_radius", "predict")
    def test_a_well_formed_answer_is_returned_with_the_contract_dtypes(self, signature):
        checked = serving_client.check_answer(signature, GOOD[signature], 3, CONTRACT, radius=np.full(3, ASKED))
        self.assertEqual(set(checked), set(GOOD[signature]))
        for name, values in GOOD[signature].items():
            self.assertEqual(checked[name].dtype, serving_client.OUTPUTS[signature][name])
            np.testing.assert_array_equal(checked[name], np.array(values, serving_client.OUTPUTS[signature][name]))

    @parameterized.named_parameters(*MALFORMED)
    def test_each_violation_names_its_field(self, signature, outputs, message):
        with self.assertRaises(serving_client.ContractError) as caught:
            serving_client.check_answer(signature, outputs, 3, CONTRACT, radius=np.full(3, ASKED))
        self.assertEqual(str(caught.exception), message)

    def test_without_a_contract_only_the_model_free_checks_run(self):
        # Class 99, samples 999 and a radius above sigma Phi^-1(p_lower) need the model's metadata.
        outputs = _with("serving_default", **{"class": [99, -1, 9]}, radius=[5.0, 0.0, 0.1])
        checked = serving_client.check_answer("serving_default", outputs, 3)
        np.testing.assert_array_equal(checked["class"], [99, -1, 9])
        serving_client.check_answer("predict", _with("predict", samples=[7, 1000, 1000]), 3)
        with self.assertRaisesRegex(serving_client.ContractError, r"^class\[1\] = -7 is neither a class nor -1"):
            serving_client.check_answer("serving_default", _with("serving_default", **{"class": [3, -7, 9]}), 3)
        with self.assertRaisesRegex(serving_client.ContractError, r"^radius\[0\] = nan"):
            serving_client.check_answer("serving_default", _with("serving_default", radius=[np.nan, 0, 0.1]), 3)

    def test_the_radius_bound_allows_for_float32_rounding_and_little_more(self):
        # The largest float32 radius that a float64 p with float32(p) = p_lower can give, and the next one up.
        # Computed here with mpmath at 50 digits, independently of the client's statistics.NormalDist.
        import mpmath  # pylint: disable=import-outside-toplevel
        mpmath.mp.dps = 50
        p_lower = np.float32(0.9)
        p_max = mpmath.mpf(float(p_lower)) + mpmath.mpf(2) ** -25  # p just below the next float32's midpoint
        exact = 0.25 * mpmath.sqrt(2) * mpmath.erfinv(2 * p_max - 1)
        largest = np.float32(float(exact))
        answer = _with("serving_default", radius=[float(largest), 0.0, 0.1])
        serving_client.check_answer("serving_default", answer, 3, CONTRACT)
        # A radius 1e-6 above: beyond anything p_lower = 0.9 supports. The client's slack past `largest` is
        # ~8e-8 here: the extra 2^-25 in p times sigma / phi(Phi^-1(0.9)) = 0.25 / 0.175, plus 2^-23 of 0.32.
        answer = _with("serving_default", radius=[float(largest) + 1e-6, 0.0, 0.1])
        with self.assertRaisesRegex(serving_client.ContractError, r"^radius\[0\] = .* exceeds sigma"):
            serving_client.check_answer("serving_default", answer, 3, CONTRACT)

    @parameterized.named_parameters(
        ("num_classes", {"num_classes": 1}, "num_classes = 1 is not an integer >= 2"),
        ("stages", {"stages": [100, 100]}, r"stages = \[100, 100\] is not an increasing list"),
        ("sigma", {"sigma": float("nan")}, "sigma = nan is not a finite number > 0"),
        ("missing", {"sigma": None}, "lacks sigma"),
        ("max_batch", {"max_batch": 0}, "max_batch = 0 is not an integer >= 1"),
    )
    def test_bad_metadata_is_refused(self, change, message):
        metadata = {**METADATA, **change}
        if metadata["sigma"] is None:
            del metadata["sigma"]
        with self.assertRaisesRegex(serving_client.ContractError, "^the model's metadata.*" + message):
            serving_client.Contract.from_metadata(metadata)


class InputContractTest(parameterized.TestCase):
    """The export's noise mode in the contract, and the grid contract checked before a request is sent."""

    def test_the_contract_reads_the_noise_mode(self):
        self.assertEqual(serving_client.Contract.from_metadata(METADATA).noise, "float")  # An older export.
        self.assertEqual(serving_client.Contract.from_metadata({**METADATA, "noise": "grid"}).noise, "grid")
        with self.assertRaisesRegex(serving_client.ContractError,
                                    "^the model's metadata: noise = 'gauss' is not one of float, grid$"):
            serving_client.Contract.from_metadata({**METADATA, "noise": "gauss"})

    def test_grid_images_are_checked_naming_the_first_bad_pixel(self):
        grid = serving_client.Contract(noise="grid")
        # Every level, as numpy computes float32(k) / 255 (one correctly rounded division, as TensorFlow's).
        every_level = (np.arange(256, dtype=np.float32) / np.float32(255)).reshape(64, 2, 2, 1)
        np.testing.assert_array_equal(serving_client.check_images(every_level, grid), every_level)
        for value in (np.nextafter(every_level[1, 0, 1, 0], np.float32(1)), 0.3, -0.0039, 1.5, np.nan):
            images = every_level.copy()
            images[1, 0, 1, 0] = value
            with self.subTest(value=value):
                with self.assertRaisesRegex(ValueError, r"^images\[1, 0, 1, 0\] = .* is not on the 8-bit grid"):
                    serving_client.check_images(images, grid)
                # A float export's range is the server's to check: the client sends the request as it is.
                self.assertEqual(serving_client.check_images(images, serving_client.Contract()).dtype, np.float32)

    def test_the_rest_client_refuses_off_grid_images_before_sending(self):
        # Nothing listens on the port: had the request been sent, the error would be a ServingError.
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            port = unused.getsockname()[1]
        client = serving_client.RestClient("127.0.0.1", port, contract=serving_client.Contract(noise="grid"))
        with self.assertRaisesRegex(ValueError, r"^images\[0, 0, 0, 0\] = 0.5 is not on the 8-bit grid"):
            client.certify(np.full((1, 2, 2, 1), 0.5, np.float32))
        with self.assertRaisesRegex(ValueError, "is not on the 8-bit grid"):
            client.certify_radius(np.full((1, 2, 2, 1), 0.5, np.float32), 0.1)
        with self.assertRaises(serving_client.ServingError):
            client.predict(np.full((1, 2, 2, 1), np.float32(128) / np.float32(255), np.float32))


class _CannedRestServer:
    """An HTTP server on 127.0.0.1 (port 0) that answers every POST with one fixed body.

    It stops when the `with` block ends, or by itself after _CANNED_LIFETIME
    seconds; a connection that stalls is dropped after _TIMEOUT.
    """

    def __init__(self, body: bytes, status: int = 200):
        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = _TIMEOUT

            def log_message(self, *args):
                pass

            def do_POST(self):  # pylint: disable=invalid-name
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)
        self._timer = threading.Timer(_CANNED_LIFETIME, self._server.shutdown)
        self._timer.daemon = True

    def __enter__(self) -> "_CannedRestServer":
        self._thread.start()
        self._timer.start()
        return self

    def __exit__(self, *exc_info):
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def canned_rest_server(outputs=None, *, body=None) -> _CannedRestServer:
    """A server answering {"outputs": outputs}, or the raw `body`."""
    return _CannedRestServer(json.dumps({"outputs": outputs}).encode() if body is None else body)


def _call(client, signature, inputs):
    if signature == "serving_default":
        return client.certify(inputs["images"])
    if signature == "certify_radius":
        return client.certify_radius(inputs["images"], inputs["radius"])
    return client.predict(inputs["images"])


class RestContractTest(parameterized.TestCase):
    """The REST client against a loopback server that returns each malformed answer."""

    def _client(self, port):
        return serving_client.RestClient("127.0.0.1", port, _MODEL_NAME, timeout=_TIMEOUT, contract=CONTRACT)

    @parameterized.parameters("serving_default", "certify_radius", "predict")
    def test_a_well_formed_answer_is_returned(self, signature):
        with canned_rest_server(GOOD[signature]) as server:
            answer = _call(self._client(server.port), signature, _request(signature))
        classes = answer if signature == "predict" else answer.classes
        np.testing.assert_array_equal(classes, GOOD[signature]["class"])

    @parameterized.named_parameters(*MALFORMED)
    def test_a_malformed_answer_is_one_line_naming_the_field(self, signature, outputs, message):
        with canned_rest_server(outputs) as server:
            client = self._client(server.port)
            with self.assertRaises(serving_client.ContractError) as caught:
                _call(client, signature, _request(signature))
        self.assertEqual(str(caught.exception),
                         f"{client.url}: the {signature} answer breaks its contract: {message}")

    @parameterized.named_parameters(
        ("not_json", b"<html>502 Bad Gateway</html>", "the serving_default answer is not JSON: '<html>502"),
        ("not_utf8", b"\xff\xfe{", "the serving_default answer is not JSON"),
        ("a_list", b"[1, 2, 3]", r"the serving_default answer has no 'outputs': \[1, 2, 3\]"),
        ("no_outputs", b'{"predictions": [1]}', "the serving_default answer has no 'outputs'"),
    )
    def test_a_body_without_outputs_is_one_line(self, body, message):
        with _CannedRestServer(body) as server:
            client = self._client(server.port)
            with self.assertRaisesRegex(serving_client.ContractError, f"^{re.escape(client.url)}: {message}"):
                client.certify(_request("serving_default")["images"])

    def test_an_error_body_that_is_a_list_is_reported_as_sent(self):
        with _CannedRestServer(b'["busy"]', status=503) as server:
            client = self._client(server.port)
            with self.assertRaisesRegex(serving_client.ServingError, r'HTTP 503: \["busy"\]$'):
                client.certify(_request("serving_default")["images"])


class _CannedPredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """gRPC Predict answering each signature with a fixed {name: ndarray}, and `metadata` with METADATA."""

    def __init__(self, answers, metadata=None):
        self.answers = answers
        self.metadata = METADATA if metadata is None else metadata
        self.versions_asked = []

    def Predict(self, request, context):  # pylint: disable=invalid-name
        signature = request.model_spec.signature_name
        if signature == "metadata":
            self.versions_asked.append(request.model_spec.version.value)
            outputs = {k: np.asarray(v) for k, v in self.metadata.items()}
        else:
            outputs = self.answers[signature]
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = 3  # the version that answered
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response


class GrpcContractTest(parameterized.TestCase):
    """The gRPC client against a loopback server returning real PredictResponse protos."""

    def _serve(self, answers, metadata=None):
        service = _CannedPredictionService(answers, metadata)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.addCleanup(lambda: server.stop(grace=None).wait(timeout=10))
        return serving_client.GrpcClient(f"127.0.0.1:{port}", _MODEL_NAME, timeout=_TIMEOUT), service

    @staticmethod
    def _arrays(signature, **changes):
        # A change given as an array keeps its dtype; lists take the contract's.
        return {k: v if isinstance(v, np.ndarray) else np.asarray(v, serving_client.OUTPUTS[signature][k])
                for k, v in {**GOOD[signature], **changes}.items()}

    def test_well_formed_answers_are_checked_against_the_answering_versions_metadata(self):
        client, service = self._serve({s: self._arrays(s) for s in GOOD})
        with client:
            for signature in GOOD:
                answer = _call(client, signature, _request(signature))
                classes = answer if signature == "predict" else answer.classes
                np.testing.assert_array_equal(classes, GOOD[signature]["class"])
        self.assertEqual(service.versions_asked, [3])  # fetched once, for version 3

    @parameterized.named_parameters(
        ("class_of_another_model", "serving_default", {"class": [3, -1, 12]},
         "class[2] = 12 is not a class of 10 (0 to 9) nor -1 (abstain)"),
        ("samples_not_a_stage", "predict", {"samples": [100, 1000, 500]},
         "samples[2] = 500 is not one of the stages [100, 1000]"),
        ("radius_inf", "certify_radius", {"radius": [np.inf, 0.0, 0.1]}, "radius[0] = inf is not a finite radius >= 0"),
        ("class_as_float", "serving_default", {"class": np.array([3, -1, 9], np.float32)},
         "class is float32 [3], expected int64 [3] (one per image)"),
        ("too_few_rows", "predict", {"samples": [100, 1000]},
         "samples has shape [2], expected int64 [3] (one per image)"),
        ("a_matrix", "serving_default", {"p_lower": [[0.9, 0.4, 0.7]]},
         "p_lower has shape [1, 3], expected float32 [3] (one per image)"),
    )
    def test_a_malformed_answer_is_one_line_naming_the_field(self, signature, changes, message):
        client, _ = self._serve({signature: self._arrays(signature, **changes)})
        with client, self.assertRaisesRegex(
                serving_client.ContractError,
                f"^{client.target}: the {signature} answer breaks its contract: {re.escape(message)}$"):
            _call(client, signature, _request(signature))

    def test_metadata_without_num_classes_is_refused(self):
        client, _ = self._serve({"predict": self._arrays("predict")},
                                metadata={"stages": [100, 1000], "sigma": 0.25})
        with client, self.assertRaisesRegex(serving_client.ContractError,
                                            f"^{client.target}: the model's metadata lacks num_classes"):
            client.predict(_request("predict")["images"])


if __name__ == "__main__":
    tf.test.main()
