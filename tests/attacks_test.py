"""Tests for tf_consreg.attacks.smoothadv_pgd on models with known worst cases."""

from absl.testing import parameterized
import keras
import numpy as np
from scipy import special
import tensorflow as tf

from tf_consreg import attacks

_SHAPE = (2, 2, 1)  # tiny images: 4 pixels
_DIM = int(np.prod(_SHAPE))


def _unit(v):
    return v / np.linalg.norm(v)


class _LinearModel:
    """Logits [w.x, -w.x] for flattened x: a plain callable with known gradients.

    With s_i = w.(x + noise_i), class 0 has probability p_i = sigmoid(2 s_i), and
    the smoothed loss for label 0 is L = -log(mean_i p_i). Its gradient,
        dL/dx = -(2 / mean_i p_i) * mean_i[p_i (1 - p_i)] * w,
    is a negative multiple of w whatever x and the noises are, so every PGD
    step moves x along -w/||w|| (along +w/||w|| for label 1), and the optimum
    over the L2 ball without clipping is x - epsilon * w/||w||.
    """

    def __init__(self, w, dtype=tf.float64):
        self.w = tf.constant(w, dtype)

    def __call__(self, x, training=None):
        del training
        s = tf.linalg.matvec(tf.reshape(x, [tf.shape(x)[0], -1]), self.w)
        return tf.stack([s, -s], axis=1)


def _linear_reference(w, images, labels, noises, epsilon, num_steps):
    """The authors' PGD loop in numpy with the analytic gradient of _LinearModel."""
    batch = len(images)
    x = images.reshape(batch, -1)
    adv = x.copy()
    sign = np.where(labels == 0, 1.0, -1.0)[:, None]  # class-y logit is sign * s
    noise = noises.reshape(len(noises), batch, -1)
    for _ in range(num_steps):
        s = (adv[None] + noise) @ w  # [m, B]
        p = special.expit(2 * sign.T * s)  # probability of the label, per copy
        # Gradient of the batch mean of -log(mean_i p_i).
        grad = -(2 * (p * (1 - p)).mean(0) / p.mean(0))[:, None] * sign * w[None] / batch
        adv = adv + 2 * epsilon / num_steps * grad / (np.linalg.norm(grad, axis=1, keepdims=True) + 1e-8)
        delta = adv - x
        norm = np.linalg.norm(delta, axis=1, keepdims=True)
        delta = delta * np.where(norm > epsilon, epsilon / (norm + 1e-7), 1.0)
        adv = np.clip(x + delta, 0, 1)
    return adv.reshape(images.shape)


def _small_convnet(with_batchnorm=False):
    keras.utils.set_random_seed(0)
    layers = [keras.Input(_SHAPE), keras.layers.Flatten(), keras.layers.Dense(8, activation="tanh")]
    if with_batchnorm:
        layers.append(keras.layers.BatchNormalization())
    layers.append(keras.layers.Dense(3))
    return keras.Sequential(layers)


def _smoothed_nll(model, images, labels, noises):
    """Per-example -log(mean_i softmax(f(x + noise_i))_y), evaluated with numpy."""
    probs = np.mean([special.softmax(np.asarray(model(images + n, training=False)), axis=1)
                     for n in noises], axis=0)
    return -np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-20))


class LinearClosedFormTest(tf.test.TestCase, parameterized.TestCase):

    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        self.w = np.array([0.3, -0.5, 0.8, 0.1])
        self.noises = rng.normal(scale=0.25, size=(3, 2) + _SHAPE)
        self.model = _LinearModel(self.w)

    @parameterized.product(num_steps=[1, 2, 5], label=[0, 1])
    def test_moves_along_w_by_epsilon(self, num_steps, label):
        images = np.full((2,) + _SHAPE, 0.5)  # interior: clipping does not bind
        labels = np.array([label, label])
        epsilon = 0.2
        adv = attacks.smoothadv_pgd(self.model, images, labels, self.noises,
                                    epsilon=epsilon, num_steps=num_steps)
        direction = -1.0 if label == 0 else 1.0
        expected = images + direction * epsilon * _unit(self.w).reshape(_SHAPE)
        # The step overshoots the ball (2 * epsilon in total) and is projected back.
        self.assertAllClose(adv, np.broadcast_to(expected, adv.shape), atol=1e-6)

    @parameterized.parameters(1, 3, 7)
    def test_clipping_binds_near_the_boundary(self, num_steps):
        # Pixels at 0 where w > 0 cannot move along -w: the attack must keep
        # them at exactly 0 and spend the budget elsewhere.
        images = np.array([[0.0, 0.9, 0.0, 0.5], [0.02, 0.98, 0.5, 0.0]]).reshape((2,) + _SHAPE)
        labels = np.array([0, 0])
        epsilon = 0.5
        adv = attacks.smoothadv_pgd(self.model, images, labels, self.noises,
                                    epsilon=epsilon, num_steps=num_steps).numpy()
        expected = _linear_reference(self.w, images, labels, self.noises, epsilon, num_steps)
        self.assertAllClose(adv, expected, atol=1e-9)
        self.assertAllInRange(adv, 0.0, 1.0)
        flat = adv.reshape(2, -1)
        self.assertEqual(flat[0, 0], 0.0)  # clipped at the lower bound
        self.assertEqual(flat[0, 2], 0.0)
        self.assertEqual(flat[1, 1], 1.0)  # w < 0 pushes it up: clipped at 1
        norms = np.linalg.norm((adv - images).reshape(2, -1), axis=1)
        self.assertAllLessEqual(norms, epsilon + 1e-5)

    def test_tiny_gradients_follow_the_authors_guard(self):
        # With ||grad|| ~ 1e-8 the step is alpha * ||g|| / (||g|| + 1e-8) < alpha,
        # and the loss being a batch mean (not a sum) changes ||g||: both must
        # match the authors' loop, so the projection must not bind here.
        w = 1e-8 * self.w
        images = np.full((2,) + _SHAPE, 0.5)
        labels = np.array([0, 1])
        adv = attacks.smoothadv_pgd(_LinearModel(w), images, labels, self.noises,
                                    epsilon=0.2, num_steps=4).numpy()
        expected = _linear_reference(w, images, labels, self.noises, 0.2, 4)
        self.assertAllClose(adv, expected, atol=1e-9)
        moved = np.linalg.norm((adv - images).reshape(2, -1), axis=1)
        self.assertAllInRange(moved, 0.01, 0.19)

    def test_noise_list_and_stacked_tensor_agree(self):
        images = np.full((2,) + _SHAPE, 0.4)
        labels = np.array([0, 1])
        as_list = attacks.smoothadv_pgd(self.model, images, labels, list(self.noises),
                                        epsilon=0.3, num_steps=3)
        as_tensor = attacks.smoothadv_pgd(self.model, images, labels, tf.constant(self.noises),
                                          epsilon=0.3, num_steps=3)
        self.assertAllEqual(as_list, as_tensor)

    def test_float32_model(self):
        model = _LinearModel(self.w, tf.float32)
        images = np.full((2,) + _SHAPE, 0.5, np.float32)
        adv = attacks.smoothadv_pgd(model, images, np.array([0, 0]), self.noises.astype(np.float32),
                                    epsilon=0.1, num_steps=2)
        self.assertEqual(adv.dtype, tf.float32)
        expected = images - 0.1 * _unit(self.w).reshape(_SHAPE)
        self.assertAllClose(adv, expected, atol=1e-6)


class KerasModelTest(tf.test.TestCase, parameterized.TestCase):

    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(1)
        self.images = rng.uniform(size=(4,) + _SHAPE).astype(np.float32)
        self.images[0, 0, 0, 0] = 1.0  # on the boundary
        self.labels = np.array([0, 1, 2, 1])
        self.noises = rng.normal(scale=0.5, size=(2, 4) + _SHAPE).astype(np.float32)

    @parameterized.parameters(0.05, 0.5, 2.0)
    def test_norm_bound_range_and_loss_increase(self, epsilon):
        model = _small_convnet()
        adv = attacks.smoothadv_pgd(model, self.images, self.labels, self.noises,
                                    epsilon=epsilon, num_steps=4).numpy()
        norms = np.linalg.norm((adv - self.images).reshape(4, -1), axis=1)
        self.assertAllLessEqual(norms, epsilon + 1e-5)
        self.assertAllInRange(adv, 0.0, 1.0)
        before = _smoothed_nll(model, self.images, self.labels, self.noises)
        after = _smoothed_nll(model, adv, self.labels, self.noises)
        self.assertAllGreater(after - before, 0.0)

    @parameterized.parameters(0.0, 0)
    def test_zero_epsilon_is_identity(self, epsilon):
        adv = attacks.smoothadv_pgd(_small_convnet(), self.images, self.labels, self.noises,
                                    epsilon=epsilon, num_steps=3)
        self.assertAllEqual(adv, self.images)

    def test_no_gradient_reaches_the_model(self):
        model = _small_convnet()
        images = tf.constant(self.images)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(images)
            adv = attacks.smoothadv_pgd(model, images, self.labels, self.noises,
                                        epsilon=0.5, num_steps=2)
            total = tf.reduce_sum(adv)
        self.assertTrue(all(g is None for g in tape.gradient(total, model.trainable_variables)))
        self.assertIsNone(tape.gradient(total, images))

    def test_batchnorm_statistics_frozen(self):
        model = _small_convnet(with_batchnorm=True)
        before = [v.numpy().copy() for v in model.non_trainable_variables]
        attacks.smoothadv_pgd(model, self.images, self.labels, self.noises, epsilon=0.5, num_steps=3)
        for b, v in zip(before, model.non_trainable_variables):
            self.assertAllEqual(b, v)

    def test_traces_once_with_variable_epsilon(self):
        model = _small_convnet()
        epsilon = tf.Variable(0.1)

        @tf.function
        def attack(images, labels, noises):
            return attacks.smoothadv_pgd(model, images, labels, noises, epsilon=epsilon, num_steps=3)

        results = {}
        for value in (0.1, 0.0, 0.7):
            epsilon.assign(value)
            results[value] = attack(self.images, self.labels, self.noises).numpy()
            eager = attacks.smoothadv_pgd(model, self.images, self.labels, self.noises,
                                          epsilon=value, num_steps=3)
            self.assertAllClose(results[value], eager, atol=1e-6)
        self.assertEqual(attack.experimental_get_tracing_count(), 1)
        self.assertAllEqual(results[0.0], self.images)
        norms = np.linalg.norm((results[0.7] - self.images).reshape(4, -1), axis=1)
        self.assertGreater(norms.max(), 0.1)

    def test_runs_in_replica_context(self):
        strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
        with strategy.scope():
            model = _small_convnet()

        @tf.function
        def step(images, labels, noises):
            return strategy.run(
                lambda x, y, n: attacks.smoothadv_pgd(model, x, y, n, epsilon=0.3, num_steps=2),
                args=(images, labels, noises))

        adv = step(self.images, self.labels, self.noises)
        eager = attacks.smoothadv_pgd(model, self.images, self.labels, self.noises,
                                      epsilon=0.3, num_steps=2)
        self.assertAllClose(strategy.experimental_local_results(adv)[0], eager, atol=1e-6)

    def test_unknown_batch_size_in_tf_function(self):
        model = _small_convnet()
        spec = tf.TensorSpec((None,) + _SHAPE, tf.float32)

        @tf.function(input_signature=[spec, tf.TensorSpec([None], tf.int64),
                                      tf.TensorSpec((2, None) + _SHAPE, tf.float32)])
        def attack(images, labels, noises):
            return attacks.smoothadv_pgd(model, images, labels, noises, epsilon=0.3, num_steps=2)

        adv = attack(self.images, self.labels, self.noises)
        self.assertEqual(adv.shape, self.images.shape)


class BadArgumentsTest(tf.test.TestCase, parameterized.TestCase):

    def setUp(self):
        super().setUp()
        self.model = _LinearModel(np.ones(_DIM), tf.float32)
        self.images = np.full((2,) + _SHAPE, 0.5, np.float32)
        self.labels = np.array([0, 1])
        self.noises = np.zeros((2, 2) + _SHAPE, np.float32)

    @parameterized.named_parameters(
        ("zero_steps", dict(num_steps=0), "^num_steps:"),
        ("float_steps", dict(num_steps=2.0), "^num_steps:"),
        ("negative_epsilon", dict(epsilon=-0.1), "^epsilon:"),
        ("negative_tensor_epsilon", dict(epsilon=tf.constant(-0.1)), "^epsilon:"),
        ("vector_epsilon", dict(epsilon=tf.constant([0.1, 0.2])), "^epsilon:"),
        ("noise_shape", dict(noises=np.zeros((2, 3) + _SHAPE, np.float32)), "^noises:"),
        ("noise_rank", dict(noises=np.zeros((2,) + _SHAPE, np.float32)), "^noises:"),
        ("no_noise", dict(noises=[]), "^noises:"),
        ("float_labels", dict(labels=np.array([0.0, 1.0])), "^labels:"),
        ("label_batch", dict(labels=np.array([0, 1, 1])), "^labels:"),
        ("integer_images", dict(images=np.zeros((2,) + _SHAPE, np.int32)), "^images:"),
    )
    def test_raises_value_error(self, override, pattern):
        kwargs = dict(model=self.model, images=self.images, labels=self.labels,
                      noises=self.noises, epsilon=0.1, num_steps=2)
        kwargs.update(override)
        with self.assertRaisesRegex(ValueError, pattern):
            attacks.smoothadv_pgd(**kwargs)

    def test_images_outside_unit_interval_raise(self):
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "images: values must lie in"):
            attacks.smoothadv_pgd(self.model, self.images + 0.6, self.labels, self.noises,
                                  epsilon=0.1, num_steps=1)


if __name__ == "__main__":
    tf.test.main()
