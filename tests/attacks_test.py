"""Tests for tf_consreg.attacks: SmoothAdv and SmoothMix against numpy references, closed forms and finite differences."""

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


def _linear_reference(w, images, labels, noises, *, num_steps, step_size, radius, batch_mean=True):
    """The authors' attack loop in numpy with the analytic gradient of _LinearModel.

    Steps of `step_size` on the batch mean (SmoothAdv) or sum (SmoothMix) of
    -log(mean_i p_i), each followed by torch.renorm to `radius` (None: none)
    around the images and the clip to [0, 1].
    """
    batch = len(images)
    x = images.reshape(batch, -1)
    adv = x.copy()
    sign = np.where(labels == 0, 1.0, -1.0)[:, None]  # class-y logit is sign * s
    noise = noises.reshape(len(noises), batch, -1)
    for _ in range(num_steps):
        s = (adv[None] + noise) @ w  # [m, B]
        p = special.expit(2 * sign.T * s)  # probability of the label, per copy
        grad = -(2 * (p * (1 - p)).mean(0) / p.mean(0))[:, None] * sign * w[None]
        if batch_mean:
            grad /= batch
        adv = adv + step_size * grad / (np.linalg.norm(grad, axis=1, keepdims=True) + 1e-8)
        delta = adv - x
        if radius is not None:
            norm = np.linalg.norm(delta, axis=1, keepdims=True)
            delta = delta * np.where(norm > radius, radius / (norm + 1e-7), 1.0)
        adv = np.clip(x + delta, 0, 1)
    return adv.reshape(images.shape)


def _smoothadv_reference(w, images, labels, noises, epsilon, num_steps):
    return _linear_reference(w, images, labels, noises, num_steps=num_steps,
                             step_size=2 * epsilon / num_steps, radius=epsilon)


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


class _LinearFixture(tf.test.TestCase, parameterized.TestCase):
    """_LinearModel with fixed weights and 3 noise draws for a batch of 2."""

    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        self.w = np.array([0.3, -0.5, 0.8, 0.1])
        self.noises = rng.normal(scale=0.25, size=(3, 2) + _SHAPE)
        self.model = _LinearModel(self.w)


class LinearClosedFormTest(_LinearFixture):

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
        expected = _smoothadv_reference(self.w, images, labels, self.noises, epsilon, num_steps)
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
        expected = _smoothadv_reference(w, images, labels, self.noises, 0.2, 4)
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


class _TanhModel:
    """f(x) = tanh(x W1 + b1) W2 + b2 on flattened x, float64 weights fixed by a seed.

    Smooth everywhere (unlike ReLU), so central differences of the smoothed
    loss converge at their O(h^2) rate; `numpy` is the same map in numpy.
    """

    def __init__(self, seed=3, hidden=5, classes=3):
        rng = np.random.default_rng(seed)
        self.weights = (rng.normal(size=(_DIM, hidden)), 0.1 * rng.normal(size=hidden),
                        rng.normal(size=(hidden, classes)), 0.1 * rng.normal(size=classes))
        self._tf_weights = [tf.constant(v, tf.float64) for v in self.weights]

    def numpy(self, x):
        w1, b1, w2, b2 = self.weights
        return np.tanh(x.reshape(len(x), -1) @ w1 + b1) @ w2 + b2

    def __call__(self, x, training=None):
        del training
        w1, b1, w2, b2 = self._tf_weights
        return tf.tanh(tf.reshape(x, [tf.shape(x)[0], -1]) @ w1 + b1) @ w2 + b2


def _smoothed_nll_sum(model, x, labels, noises):
    """SmoothMix's attack loss in numpy: sum_b -log(max(mean_i softmax(f(x_b + n_i))_y, 1e-20))."""
    probs = np.mean([special.softmax(model.numpy(x + n), axis=1) for n in noises], axis=0)
    return -np.sum(np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-20)))


class SmoothMixFiniteDifferenceTest(tf.test.TestCase, parameterized.TestCase):
    """One step of smoothmix_pgd against a step along the central-difference gradient."""

    @parameterized.product(step_size=[0.05, 0.3, 2.0], labels=[(0, 1, 2), (2, 2, 0)])
    def test_one_step_follows_the_numerical_gradient(self, step_size, labels):
        rng = np.random.default_rng(4)
        model = _TanhModel()
        images = rng.uniform(0.05, 0.95, size=(3,) + _SHAPE)
        images[1, 0, 0, 0] = 1.0  # on the boundary: the clip binds for steps pushing it up
        labels = np.array(labels)
        noises = rng.normal(scale=0.5, size=(4, 3) + _SHAPE)
        h = 1e-6
        grad = np.zeros_like(images)
        for index in np.ndindex(images.shape):
            up, down = images.copy(), images.copy()
            up[index] += h
            down[index] -= h
            grad[index] = (_smoothed_nll_sum(model, up, labels, noises)
                           - _smoothed_nll_sum(model, down, labels, noises)) / (2 * h)
        # Error of each central difference: rounding ~ eps * |L| / h = 2.2e-16 * 10 / 1e-6
        # ~ 2e-9 (|L| <= 10 here, asserted) plus truncation h^2 |L'''| / 6 ~ 1e-12, so
        # the error vector of one example's 4 coordinates is <= 2 * 2e-9 = 4e-9. The
        # normalized direction then errs by <= 2 * 4e-9 / ||g_b||, <= 8e-8 for
        # ||g_b|| >= 0.1 (asserted), and the step by step_size times that,
        # <= 1.6e-7 for step_size 2; the clip is 1-Lipschitz. Hence 2e-7.
        self.assertLess(_smoothed_nll_sum(model, images, labels, noises), 10.0)
        norms = np.linalg.norm(grad.reshape(3, -1), axis=1)
        self.assertAllGreater(norms, 0.1)
        expected = np.clip(images + step_size * grad / (norms + 1e-8).reshape(3, 1, 1, 1), 0, 1)
        start, end = attacks.smoothmix_pgd(model, images, labels, noises, step_size=step_size, num_steps=1)
        self.assertAllClose(end, expected, rtol=0, atol=2e-7)
        self.assertAllEqual(start, images)  # mix_step=0: the mixup starts at x


class SmoothMixLinearTest(_LinearFixture):
    """smoothmix_pgd on _LinearModel: the authors' loop in numpy, and closed forms."""

    def setUp(self):
        super().setUp()
        self.images = np.full((2,) + _SHAPE, 0.5)  # interior: the clip does not bind
        self.labels = np.array([0, 1])
        # Label 0 walks along -w/||w||, label 1 along +w/||w||.
        self.direction = np.stack([-_unit(self.w), _unit(self.w)]).reshape((2,) + _SHAPE)

    def _reference(self, num_steps, step_size, radius=None, w=None):
        return _linear_reference(self.w if w is None else w, self.images, self.labels, self.noises,
                                 num_steps=num_steps, step_size=step_size, radius=radius, batch_mean=False)

    @parameterized.parameters(1, 2, 5)
    def test_unbounded_walk_moves_step_size_per_step(self, num_steps):
        start, end = attacks.smoothmix_pgd(self.model, self.images, self.labels, self.noises,
                                           step_size=0.1, num_steps=num_steps)
        # Same float64 operations as the numpy loop: rounding only (~1e-16 per op).
        self.assertAllClose(end, self._reference(num_steps, 0.1), rtol=0, atol=1e-12)
        # Closed form x + T * alpha * direction: no bound, and the clip does not bind
        # (coordinates move <= 0.8 / ||w|| * 0.5 < 0.5). The 1e-8 guard shortens each
        # step by alpha * 1e-8 / ||g_b|| < 2e-9 (||g_b|| > 0.5 here).
        self.assertAllClose(end, self.images + num_steps * 0.1 * self.direction, rtol=0, atol=1e-8)
        self.assertAllEqual(start, self.images)

    def test_maxnorm_bounds_the_walk(self):
        _, end = attacks.smoothmix_pgd(self.model, self.images, self.labels, self.noises,
                                       step_size=0.1, num_steps=5, maxnorm=0.25)
        self.assertAllClose(end, self._reference(5, 0.1, radius=0.25), rtol=0, atol=1e-12)
        # torch.renorm's factor 0.25 / (norm + 1e-7) leaves the norm ~1e-7 short of 0.25.
        self.assertAllClose(end, self.images + 0.25 * self.direction, rtol=0, atol=1e-6)

    @parameterized.named_parameters(
        ("clean", 0, 0), ("one_step", 1, 1), ("two_steps", 2, 2), ("at_t", 3, 0), ("past_t", 5, 0))
    def test_start_point_is_the_walk_after_mix_step_steps(self, mix_step, steps_taken):
        start, end = attacks.smoothmix_pgd(self.model, self.images, self.labels, self.noises, step_size=0.1,
                                           num_steps=3, mix_step=mix_step, maxnorm_s=10.0)
        # With mix_step >= T the authors never record the start: it stays x.
        expected = self._reference(steps_taken, 0.1) if steps_taken else self.images
        self.assertAllClose(start, expected, rtol=0, atol=1e-12)
        self.assertAllClose(end, self._reference(3, 0.1), rtol=0, atol=1e-12)

    def test_default_maxnorm_s_is_step_size_times_mix_step(self):
        kwargs = dict(step_size=0.1, num_steps=3, mix_step=1)
        default, _ = attacks.smoothmix_pgd(self.model, self.images, self.labels, self.noises, **kwargs)
        explicit, _ = attacks.smoothmix_pgd(self.model, self.images, self.labels, self.noises,
                                            maxnorm_s=0.1, **kwargs)
        self.assertAllEqual(default, explicit)

    def test_maxnorm_s_restricts_only_the_start(self):
        start, end = attacks.smoothmix_pgd(self.model, self.images, self.labels, self.noises,
                                           step_size=0.2, num_steps=3, mix_step=1, maxnorm_s=0.05)
        # The one-step adversary (norm ~0.2) renormed to 0.05 (factor 0.05 / (0.2 + 1e-7)).
        self.assertAllClose(start, self.images + 0.05 * self.direction, rtol=0, atol=1e-7)
        _, unrestricted = attacks.smoothmix_pgd(self.model, self.images, self.labels, self.noises,
                                                step_size=0.2, num_steps=3, mix_step=1, maxnorm_s=10.0)
        self.assertAllEqual(end, unrestricted)

    def test_zero_maxnorm_s_gives_the_clean_start(self):
        start, _ = attacks.smoothmix_pgd(self.model, self.images, self.labels, self.noises,
                                         step_size=0.2, num_steps=2, mix_step=1, maxnorm_s=0.0)
        self.assertAllEqual(start, self.images)

    def test_tiny_gradients_use_the_batch_sum(self):
        # ||g_b|| ~ 7e-9, comparable to the 1e-8 guard: each step is then
        # alpha * ||g_b|| / (||g_b|| + 1e-8) < alpha, and with the authors' batch
        # SUM it differs from a batch mean's (||g_b|| / B).
        w = 1e-8 * self.w
        _, end = attacks.smoothmix_pgd(_LinearModel(w), self.images, self.labels, self.noises,
                                       step_size=0.2, num_steps=2)
        self.assertAllClose(end, self._reference(2, 0.2, w=w), rtol=0, atol=1e-12)
        as_mean = _linear_reference(w, self.images, self.labels, self.noises, num_steps=2, step_size=0.2,
                                    radius=None, batch_mean=True)
        self.assertGreater(np.abs(np.asarray(end) - as_mean).max(), 0.01)

    def test_clip_keeps_the_walk_in_the_unit_box(self):
        images = np.array([[0.0, 0.9, 0.0, 0.5], [0.02, 0.98, 0.5, 0.0]]).reshape((2,) + _SHAPE)
        labels = np.array([0, 0])
        _, end = attacks.smoothmix_pgd(self.model, images, labels, self.noises, step_size=0.5, num_steps=4)
        expected = _linear_reference(self.w, images, labels, self.noises, num_steps=4, step_size=0.5,
                                     radius=None, batch_mean=False)
        self.assertAllClose(end, expected, rtol=0, atol=1e-12)
        self.assertAllInRange(end, 0.0, 1.0)
        self.assertEqual(np.asarray(end).reshape(2, -1)[0, 0], 0.0)  # clipped at the lower bound

    def test_float32(self):
        model = _LinearModel(self.w, tf.float32)
        start, end = attacks.smoothmix_pgd(model, self.images.astype(np.float32), self.labels,
                                           self.noises.astype(np.float32), step_size=0.1, num_steps=2,
                                           mix_step=1)
        self.assertEqual(start.dtype, tf.float32)
        self.assertEqual(end.dtype, tf.float32)
        # float32 rounding (~6e-8 relative) of ~20 operations on values <= 1: < 1e-5.
        self.assertAllClose(end, self.images + 0.2 * self.direction, rtol=0, atol=1e-5)
        self.assertAllClose(start, self.images + 0.1 * self.direction, rtol=0, atol=1e-5)


class SmoothMixKerasTest(tf.test.TestCase):

    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(1)
        self.images = rng.uniform(size=(4,) + _SHAPE).astype(np.float32)
        self.labels = np.array([0, 1, 2, 1])
        self.noises = rng.normal(scale=0.5, size=(2, 4) + _SHAPE).astype(np.float32)

    def test_inference_mode_and_no_gradient_to_the_model(self):
        model = _small_convnet(with_batchnorm=True)
        before = [v.numpy().copy() for v in model.non_trainable_variables]
        images = tf.constant(self.images)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(images)
            start, end = attacks.smoothmix_pgd(model, images, self.labels, self.noises,
                                               step_size=0.5, num_steps=3, mix_step=1)
            total = tf.reduce_sum(start) + tf.reduce_sum(end)
        self.assertTrue(all(g is None for g in tape.gradient(total, model.trainable_variables)))
        self.assertIsNone(tape.gradient(total, images))
        for b, v in zip(before, model.non_trainable_variables):
            self.assertAllEqual(b, v)
        moved = np.linalg.norm((end.numpy() - self.images).reshape(4, -1), axis=1)
        self.assertAllGreater(moved, 0.0)

    def test_traces_once_with_variable_hyperparameters(self):
        model = _small_convnet()
        step_size, maxnorm_s = tf.Variable(0.5), tf.Variable(0.1)

        @tf.function
        def attack(images, labels, noises):
            return attacks.smoothmix_pgd(model, images, labels, noises, step_size=step_size, num_steps=2,
                                         mix_step=1, maxnorm_s=maxnorm_s)

        for step, bound in ((0.5, 0.1), (1.0, 0.5), (0.25, 0.0)):
            step_size.assign(step)
            maxnorm_s.assign(bound)
            start, end = attack(self.images, self.labels, self.noises)
            eager = attacks.smoothmix_pgd(model, self.images, self.labels, self.noises, step_size=step,
                                          num_steps=2, mix_step=1, maxnorm_s=bound)
            self.assertAllClose(start, eager[0], atol=1e-6)
            self.assertAllClose(end, eager[1], atol=1e-6)
            norms = np.linalg.norm((start.numpy() - self.images).reshape(4, -1), axis=1)
            self.assertAllLessEqual(norms, bound + 1e-6)
        self.assertEqual(attack.experimental_get_tracing_count(), 1)

    def test_negative_variable_step_size_fails_at_run_time(self):
        model = _small_convnet()
        step_size = tf.Variable(0.5)

        @tf.function
        def attack(images):
            return attacks.smoothmix_pgd(model, images, self.labels, self.noises, step_size=step_size,
                                         num_steps=1)

        step_size.assign(-0.5)
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "step_size: must be > 0"):
            attack(self.images)

    def test_runs_in_replica_context_with_unknown_batch(self):
        strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
        with strategy.scope():
            model = _small_convnet()

        @tf.function(input_signature=[tf.TensorSpec((None,) + _SHAPE, tf.float32),
                                      tf.TensorSpec([None], tf.int64),
                                      tf.TensorSpec((2, None) + _SHAPE, tf.float32)])
        def step(images, labels, noises):
            return strategy.run(
                lambda x, y, n: attacks.smoothmix_pgd(model, x, y, n, step_size=0.5, num_steps=2, mix_step=1),
                args=(images, labels, noises))

        start, end = step(self.images, self.labels, self.noises)
        eager = attacks.smoothmix_pgd(model, self.images, self.labels, self.noises, step_size=0.5,
                                      num_steps=2, mix_step=1)
        self.assertAllClose(strategy.experimental_local_results(start)[0], eager[0], atol=1e-6)
        self.assertAllClose(strategy.experimental_local_results(end)[0], eager[1], atol=1e-6)


class SmoothMixInputsTest(tf.test.TestCase, parameterized.TestCase):

    def test_convex_combination_per_example(self):
        weights = np.array([0.0, 0.25, 0.5])
        mixed = attacks.smoothmix_inputs(np.zeros((3,) + _SHAPE), np.ones((3,) + _SHAPE), weights)
        self.assertAllEqual(mixed, np.broadcast_to(weights.reshape(3, 1, 1, 1), mixed.shape))
        start, end = np.random.default_rng(2).uniform(size=(2, 3) + _SHAPE)
        lam = weights.reshape(3, 1, 1, 1)
        self.assertAllClose(attacks.smoothmix_inputs(start, end, weights), (1 - lam) * start + lam * end,
                            rtol=0, atol=1e-15)

    @parameterized.named_parameters(
        ("end_shape", dict(end=np.zeros((3, 4))), "^end:"),
        ("end_dtype", dict(end=np.zeros((2, 4), np.float32)), "^end:"),
        ("weights_shape", dict(mix_weights=np.zeros(3)), "^mix_weights:"),
        ("weights_rank", dict(mix_weights=np.zeros((2, 1))), "^mix_weights:"),
    )
    def test_bad_arguments(self, override, pattern):
        kwargs = dict(start=np.zeros((2, 4)), end=np.ones((2, 4)), mix_weights=np.zeros(2))
        kwargs.update(override)
        with self.assertRaisesRegex(ValueError, pattern):
            attacks.smoothmix_inputs(**kwargs)


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

    @parameterized.named_parameters(
        ("zero_steps", dict(num_steps=0), "^num_steps:"),
        ("negative_mix_step", dict(mix_step=-1), "^mix_step:"),
        ("float_mix_step", dict(mix_step=1.0), "^mix_step:"),
        ("bool_mix_step", dict(mix_step=True), "^mix_step:"),
        ("zero_step_size", dict(step_size=0.0), "^step_size:"),
        ("negative_tensor_step_size", dict(step_size=tf.constant(-1.0)), "^step_size:"),
        ("vector_step_size", dict(step_size=tf.constant([0.1, 0.2])), "^step_size:"),
        ("zero_maxnorm", dict(maxnorm=0.0), "^maxnorm:"),
        ("negative_maxnorm", dict(maxnorm=-1.0), "^maxnorm:"),
        ("negative_maxnorm_s", dict(maxnorm_s=-0.1), "^maxnorm_s:"),
        ("noise_shape", dict(noises=np.zeros((2, 3) + _SHAPE, np.float32)), "^noises:"),
        ("float_labels", dict(labels=np.array([0.0, 1.0])), "^labels:"),
    )
    def test_smoothmix_raises_value_error(self, override, pattern):
        kwargs = dict(model=self.model, images=self.images, labels=self.labels,
                      noises=self.noises, step_size=0.5, num_steps=2)
        kwargs.update(override)
        with self.assertRaisesRegex(ValueError, pattern):
            attacks.smoothmix_pgd(**kwargs)

    def test_images_outside_unit_interval_raise(self):
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "images: values must lie in"):
            attacks.smoothadv_pgd(self.model, self.images + 0.6, self.labels, self.noises,
                                  epsilon=0.1, num_steps=1)


if __name__ == "__main__":
    tf.test.main()
