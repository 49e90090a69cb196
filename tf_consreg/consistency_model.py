"""The training wrapper: a base classifier trained on noisy copies, with any objective of objectives.py.

The wrapper draws the noise, runs the objective's terms and adds the weight
decay; the methods themselves are objectives.py's. The base classifier, not
the wrapper, is what a run saves, certifies and exports.
"""

from typing import Dict, Union

import keras
import tensorflow as tf

from tf_consreg import distribute
from tf_consreg import noise as noise_lib
from tf_consreg import objectives
from tf_consreg import run_config

# Independent random streams of one run: the copies' noise (objectives.py
# takes the next ones).
_TRAIN_NOISE, _EVAL_NOISE = 1, 2
# Epoch values that every run's checkpoint holds, whatever its method: the
# wrapper created them for all methods before each objective owned its own,
# and those checkpoints must restore. 0 for a method that has no such value.
_CHECKPOINTED_VALUES = ("attack_radius", "robust_weight")


class ConsistencyModel(keras.Model):
    """Wraps a base classifier to train it on noisy copies, with any objective of objectives.py.

    Each step draws m = `num_noise` noisy copies x + N(0, sigma^2 I) of every
    clean image (noise seeded per example, see noise.py), asks the objective
    for its terms on them (`objectives.Objective.terms`), and minimizes its
    loss plus the weight decay. The objective's epoch values (warm-ups,
    deferral) are variables of the wrapper, named `_<name>`, set by
    `set_epoch`.

    Args:
      base_model: maps images in [0, 1] to logits.
      objective: the method and its settings: an `objectives.Objective`, or
        an `ObjectiveConfig` (its `build()`).
      seed: seed of the noise; with the optimizer's step it fixes every draw.
      **kwargs: for `keras.Model` (name, ...).
    """

    def __init__(self, base_model: keras.Model, objective: Union[run_config.ObjectiveConfig, objectives.Objective], *,
                 seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.base_model = base_model
        self.objective = objective.build() if isinstance(objective, run_config.ObjectiveConfig) else objective
        self.seed = int(seed)
        self._trackers = {name: keras.metrics.Mean(name=name) for name in ("loss", *self.objective.term_names)}
        self._accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
        self._clean_accuracy = keras.metrics.SparseCategoricalAccuracy(name="clean_accuracy")
        # Counts evaluation batches, to seed evaluation noise; one per replica set.
        self._eval_steps = tf.Variable(0, dtype=tf.int64, trainable=False, name="eval_steps",
                                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        # Epoch-dependent values, set by `set_epoch` (variables: no retracing);
        # until then, their values after warm-up and deferral. Attributes, not
        # a dict: their names are their checkpoint keys.
        initial = self.objective.epoch_values()
        self._epoch_value_names = tuple(dict.fromkeys((*_CHECKPOINTED_VALUES, *initial)))
        for name in self._epoch_value_names:
            setattr(self, f"_{name}", tf.Variable(initial.get(name, 0.0), dtype=tf.float32, trainable=False,
                                                  name=name, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA))

    @property
    def metrics(self):
        return [*self._trackers.values(), self._accuracy, self._clean_accuracy]

    def call(self, inputs, training=False):
        return self.base_model(inputs, training=training)

    def set_epoch(self, epoch: int) -> None:
        """Sets the objective's values that change with the (0-based) epoch (`epoch_values`)."""
        for name, value in self.objective.epoch_values(epoch).items():
            getattr(self, f"_{name}").assign(value)

    def _cross_entropy(self, x, labels, logits, training):
        # compute_loss applies Keras's rule (local mean / replicas, see
        # distribute.py); report the local mean and scale again in train_step.
        return distribute.unscale_loss(self.compute_loss(x=x, y=labels, y_pred=logits, training=training))

    def compute_terms(self, images, labels, training: bool, step) -> Dict[str, tf.Tensor]:
        """The training objective on one (local) batch.

        Every entry is a local mean over this replica's examples, unscaled.

        Args:
          images: clean images [B, H, W, C] in [0, 1].
          labels: int labels [B].
          training: a training step (attack, training-mode layers) or an evaluation.
          step: seeds the noise together with `seed`.

        Returns:
          dict with "loss" (the objective), the objective's `term_names`, and
          "logits" [m * B, C] of the noisy copies, copy-major.
        """
        m = self.objective.num_noise
        seeds = noise_lib.example_seeds(
            noise_lib.step_seed(self.seed, _TRAIN_NOISE if training else _EVAL_NOISE, step), tf.shape(images)[0])
        noise = noise_lib.gaussian_noise(images, m, self.objective.sigma, seeds)
        return self.objective.terms(objectives.Step(
            images=images, labels=labels, noise=noise, num_copies=m, training=training, step=step, seed=self.seed,
            values={name: getattr(self, f"_{name}") for name in self._epoch_value_names},
            base_model=self.base_model,
            cross_entropy=lambda x, y, logits: self._cross_entropy(x, y, logits, training)))

    def _weight_decay_term(self) -> tf.Tensor:
        if not self.objective.weight_decay:
            return tf.constant(0.0)
        return 0.5 * self.objective.weight_decay * tf.add_n(
            [tf.reduce_sum(tf.square(tf.cast(w, tf.float32))) for w in self.base_model.trainable_weights])

    def _update_metrics(self, terms, labels, clean_logits=None):
        for name, tracker in self._trackers.items():
            tracker.update_state(terms[name])
        self._accuracy.update_state(noise_lib.tile_copies(labels, self.objective.num_noise), terms["logits"])
        reported = self.metrics
        if clean_logits is None:  # Clean accuracy is measured in evaluation only.
            reported = [m for m in reported if m is not self._clean_accuracy]
        else:
            self._clean_accuracy.update_state(labels, clean_logits)
        return {m.name: m.result() for m in reported}

    def train_step(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            terms = self.compute_terms(images, labels, training=True, step=self.optimizer.iterations)
            # One rule for every term: local mean / replicas (distribute.py).
            # Weight decay is a global quantity; each replica adds 1/replicas of it.
            loss = distribute.scale_loss(terms["loss"] + self._weight_decay_term())
            loss = self.optimizer.scale_loss(loss)
        weights = self.base_model.trainable_weights
        self.optimizer.apply(tape.gradient(loss, weights), weights)
        return self._update_metrics(terms, labels)

    def test_step(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        terms = self.compute_terms(images, labels, training=False, step=self._eval_steps)
        self._eval_steps.assign_add(1)
        return self._update_metrics(terms, labels, clean_logits=self.base_model(images, training=False))
