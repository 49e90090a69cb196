"""objectives.py: the registry of the methods, their settings and schedules, and the interface the wrapper runs.

Each method's terms are checked against float64 numpy through the wrapper in
consistency_model_test.py (TrainStepTest, SmoothMixTrainStepTest); here, the registry
and the schedules as plain values, and a method written only here (in the
test) trained by the unchanged wrapper: what adding a method takes.
"""

import dataclasses

import keras
import numpy as np
import scipy.special
import tensorflow as tf
from absl.testing import parameterized

from tf_consreg import losses
from tf_consreg import noise
from tf_consreg import objectives
from tf_consreg import consistency_model
from tf_consreg.errors import ConfigError

B, D, C = 4, 4, 3


class RegistryTest(parameterized.TestCase):

    def test_each_row_names_its_class_and_defaults_every_setting(self):
        # Every setting of a class but sigma and weight_decay has the authors' default in its row (the attack's
        # of Consistency in ADV_TRAINING_DEFAULTS), so a flag can never be left without a value.
        for method, row in objectives.REGISTRY.items():
            self.assertEqual(row.objective.name, method)
            settings = {f.name for f in dataclasses.fields(row.objective)} - {"sigma", "weight_decay"}
            given = set(row.defaults)
            if method == objectives.ADV_TRAINING_METHOD:
                given |= {"adv_training", *objectives.ADV_TRAINING_DEFAULTS}
            self.assertEqual(settings, given, method)
        self.assertEqual(objectives.METHODS, ("gaussian", "consistency", "stability", "smoothadv", "macer",
                                              "smoothmix", "standard", "denoise"))

    def test_the_consistency_forms_are_the_losses(self):
        self.assertEqual(objectives.CONSISTENCY_LOSSES, losses.CONSISTENCY_LOSSES)

    def test_create_fills_the_authors_defaults(self):
        # train_macer.py's defaults; train_consistency.py's attack (--epsilon 512 / 256, 4 steps, 10 epochs).
        self.assertEqual(objectives.create("macer", sigma=0.5),
                         objectives.Macer(sigma=0.5, weight_decay=1e-4, num_noise=16, lbd=16.0, beta=16.0, gamma=8.0,
                                          deferred_epochs=0))
        self.assertEqual(objectives.create("consistency", sigma=0.25, adv_training=True, lbd=5.0, epsilon=None),
                         objectives.Consistency(sigma=0.25, weight_decay=1e-4, num_noise=2, lbd=5.0, eta=0.5,
                                                consistency_loss="default", adv_training=True, epsilon=2.0,
                                                num_steps=4, warmup=10))
        with self.assertRaises(dataclasses.FrozenInstanceError):
            objectives.create("gaussian", sigma=0.5).sigma = 1.0

    @parameterized.named_parameters(
        ("unknown", "mixup", {}, "^--method='mixup' is unknown; choose one of gaussian, consistency, "),
        ("unused", "gaussian", dict(eta=0.5), "^--eta is used only by --method=consistency or --method=smoothmix; "
                                               "remove it for --method=gaussian$"),
        ("derived", "stability", dict(deferred_epochs=2), "^deferred_epochs is used only by --method=macer; "),
        ("adv_training", "macer", dict(adv_training=True), "^--adv_training combines SmoothAdv with "
                                                           "--method=consistency; for --method=macer"),
        ("range", "smoothadv", dict(epsilon=-0.1), r"^--epsilon must be >= 0 \(an L2 radius in \[0, 1\] pixel "
                                                   r"units\), got -0.1$"),
        ("sigma", "gaussian", dict(sigma=-1.0), "^--sigma must be > 0, got -1.0$"),
        ("stability_copies", "stability", dict(num_noise=2), "^--method=stability draws one noise per image"),
        ("mse_copies", "consistency", dict(num_noise=3, consistency_loss="mse"),
         "^--consistency_loss=mse needs --num_noise=2, got 3$"),
        ("consistency_form", "consistency", dict(consistency_loss="l1"), "^--consistency_loss='l1' is unknown"),
    )
    def test_create_refuses(self, method, settings, message):
        with self.assertRaisesRegex(ConfigError, message):
            objectives.create(method, **{"sigma": 0.5, **settings})


class EpochValuesTest(parameterized.TestCase):
    """The schedules as plain values (the wrapper's variables: consistency_model_test's AdversarialAndScheduleTest)."""

    @parameterized.named_parameters(
        # SmoothAdv: min(epsilon, (epoch + 1) * epsilon / warmup).
        ("smoothadv", dict(method="smoothadv", epsilon=1.0, warmup=4),
         [{"attack_radius": r} for r in (0.25, 0.5, 0.75, 1.0, 1.0)], {"attack_radius": 1.0}),
        ("adv_consistency", dict(method="consistency", adv_training=True, epsilon=0.5, warmup=2),
         [{"attack_radius": r} for r in (0.25, 0.5, 0.5, 0.5, 0.5)], {"attack_radius": 0.5}),
        ("consistency", dict(method="consistency"), [{}] * 5, {}),
        ("gaussian", dict(method="gaussian"), [{}] * 5, {}),
        # MACER: 0 for deferred_epochs epochs, then lbd.
        ("macer", dict(method="macer", lbd=6.0, deferred_epochs=3),
         [{"robust_weight": w} for w in (0.0, 0.0, 0.0, 6.0, 6.0)], {"robust_weight": 6.0}),
        # SmoothMix: eta and maxnorm_s (default attack_step * mix_step = 0.5) times min(1, (epoch + 1) / warmup).
        ("smoothmix", dict(method="smoothmix", eta=4.0, warmup=2, attack_step=0.5, mix_step=1),
         [{"mixup_weight": 2.0, "start_bound": 0.25}] + [{"mixup_weight": 4.0, "start_bound": 0.5}] * 4,
         {"mixup_weight": 4.0, "start_bound": 0.5}),
    )
    def test_schedule(self, settings, by_epoch, after_warmup):
        objective = objectives.create(sigma=0.5, **settings)
        self.assertEqual([objective.epoch_values(epoch) for epoch in range(5)], by_epoch)
        self.assertEqual(objective.epoch_values(), after_warmup)


@dataclasses.dataclass(frozen=True)
class _ScaledCleanCrossEntropy(objectives.Objective):
    """A method the registry does not know: `scale` times the clean cross-entropy, scale = min(1, (epoch + 1) / 4).

    It reports the copies' logits (for the accuracy) and their cross-entropy
    as a term, and owns an epoch value no other method has.
    """

    num_noise: int = 2

    name = "scaled_clean"
    term_names = ("clean_cross_entropy", "noisy_cross_entropy")

    def epoch_values(self, epoch=None):
        return {"scale": 1.0 if epoch is None else min(1.0, (epoch + 1) / 4)}

    def terms(self, step):
        noisy = step.noisy(step.images)
        logits = step.forward(noisy)
        noisy_ce = step.cross_entropy(noisy, noise.tile_copies(step.labels, step.num_copies), logits)
        clean_ce = step.cross_entropy(step.images, step.labels, step.forward(step.images))
        return {"logits": logits, "clean_cross_entropy": clean_ce, "noisy_cross_entropy": noisy_ce,
                "loss": step.values["scale"] * clean_ce}


class NewObjectiveTest(tf.test.TestCase):
    """The wrapper trains an objective defined outside objectives.py, with its own terms and epoch value."""

    def test_one_step_matches_the_closed_form(self):
        rng = np.random.default_rng(5)
        weights, bias = rng.normal(size=(D, C)), rng.normal(size=C) * 0.1
        images = rng.uniform(size=(B, 2, 2, 1)).astype(np.float32)
        labels = np.array([0, 2, 1, 2])
        lr, weight_decay = 0.1, 0.01
        inputs = keras.Input((2, 2, 1))
        dense = keras.layers.Dense(C)
        base = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
        dense.set_weights([weights.astype(np.float32), bias.astype(np.float32)])
        model = consistency_model.ConsistencyModel(
            base, _ScaledCleanCrossEntropy(sigma=0.5, weight_decay=weight_decay), seed=2)
        model.compile(optimizer=keras.optimizers.SGD(lr),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        # Its value is a variable of the wrapper, after the two every checkpoint holds (at 0: it has neither).
        values = [model._scale, model._attack_radius, model._robust_weight]  # pylint: disable=protected-access
        self.assertEqual([float(v.numpy()) for v in values], [1.0, 0.0, 0.0])
        model.set_epoch(1)
        logs = model.train_on_batch(images, labels, return_dict=True)

        # Clean cross-entropy of a linear model: CE = mean_i -log softmax(x_i W + b)_{y_i}, with gradient
        # dCE/dW = X^T (P - Y) / B, dCE/db = sum_i (P - Y)_i / B (P the softmax, Y the one-hot labels).
        # The loss is scale * CE, scale = 2/4 at epoch 1, plus weight_decay / 2 * (|W|^2 + |b|^2).
        x = images.reshape(B, D).astype(np.float64)
        p = scipy.special.softmax(x @ weights + bias, axis=1)
        clean_ce = -np.mean(np.log(p[np.arange(B), labels]))
        residual = (p - np.eye(C)[labels]) / B
        scale = 0.5
        # float32 against float64 on a 4x4x3 linear model: the rounding (2^-24 relative per operation, over
        # sums of <= 8 terms) stays below 1e-6 relative; rtol 1e-5 leaves a factor 10.
        self.assertAllClose(logs["clean_cross_entropy"], clean_ce, rtol=1e-5)
        self.assertAllClose(logs["loss"], scale * clean_ce, rtol=1e-5)
        self.assertEqual(set(logs), {"loss", "clean_cross_entropy", "noisy_cross_entropy", "accuracy"})
        new_w, new_b = base.get_weights()
        self.assertAllClose(new_w, weights - lr * (scale * x.T @ residual + weight_decay * weights), rtol=1e-5,
                            atol=1e-6)
        self.assertAllClose(new_b, bias - lr * (scale * residual.sum(axis=0) + weight_decay * bias), rtol=1e-5,
                            atol=1e-6)


if __name__ == "__main__":
    tf.test.main()
