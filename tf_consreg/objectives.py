"""The training methods, one class per method, and the registry of the authors' defaults.

An objective is a small frozen value: its fields are its method's settings
(`Consistency.eta` is the entropy weight, `SmoothMix.eta` the mixup weight;
`Macer.num_noise` is K), checked at construction. It tells the training
wrapper (`ConsistencyModel`) three things:

* `term_names`: the terms it reports besides "loss" (metrics of training and
  evaluation);
* `epoch_values(epoch)`: its values that change with the epoch (a warm-up, a
  deferral), which the wrapper keeps in variables so that a new value does
  not retrace the step;
* `terms(step)`: the loss and those terms on one local batch, given the model,
  the batch, its noise and the epoch values (a `Step`).

The wrapper draws the noise, runs what the objective computes, and adds the
weight decay. The loss functions themselves are free functions of losses.py
and attacks.py; `terms` imports them where it uses them, because run_config
validates a run's flags with this registry and must load neither.

A new method is a class here and a row of `REGISTRY` (with its part of
bin/train.py's --method help in cli.TRAIN_HELP; a setting of its own is a field
of `run_config.ObjectiveConfig` too, since the flags are made from it).
"""

import abc
import dataclasses
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Tuple, Type

import keras
import tensorflow as tf

from tf_consreg import noise as noise_lib
from tf_consreg.errors import ConfigError, check

# The forms of the consistency term (losses.CONSISTENCY_LOSSES, which the loss
# functions check; objectives_test holds the two equal). Repeated here so
# that validating a flag does not load the losses.
CONSISTENCY_LOSSES = ("default", "xent", "kl", "mse")

# The range of each setting, checked by every objective that has it:
# field -> (comparison, bound, what the value means).
_RANGES = {
    "sigma": (">", 0, ""),
    "weight_decay": (">=", 0, ""),
    "num_noise": (">=", 1, ""),
    "lbd": (">=", 0, ""),
    "eta": (">=", 0, ""),
    "beta": (">", 0, ""),
    "gamma": (">=", 0, ""),
    "deferred_epochs": (">=", 0, ""),
    "epsilon": (">=", 0, " (an L2 radius in [0, 1] pixel units)"),
    "num_steps": (">=", 1, ""),
    "warmup": (">=", 1, ""),
    "attack_step": (">", 0, " (an L2 step length in [0, 1] pixel units)"),
    "maxnorm": (">", 0, " (an L2 bound in [0, 1] pixel units; leave it unset for the default)"),
    "maxnorm_s": (">", 0, " (an L2 bound in [0, 1] pixel units; leave it unset for the default)"),
}
# --method=denoise's objectives (Salman et al., 2020; "consistency" is ours).
DENOISE_OBJECTIVES = ("mse", "stability", "consistency")
# Settings that are no flags: set from other flags (TrainConfig's --deferred).
DERIVED = ("deferred_epochs",)


def _label(name: str) -> str:
    return name if name in DERIVED else f"--{name}"


@dataclasses.dataclass(frozen=True)
class Step:
    """One local batch as an objective sees it, with what the wrapper provides.

    Attributes:
      images: clean images [B, H, W, C] in [0, 1].
      labels: int labels [B].
      noise: the m noisy copies' noise [m * B, H, W, C], copy-major
        (`noise.gaussian_noise`).
      num_copies: m, the objective's `num_noise`.
      training: a training step (attacks, training-mode layers) or an evaluation.
      step: the counter that, with `seed`, keys every random draw of the step.
      seed: the run's seed.
      values: the objective's `epoch_values`, as variables.
      base_model: the base classifier (attacks run it in inference mode).
      cross_entropy: (inputs, labels, logits) -> Keras's compiled loss, the
        local mean over this replica's examples, unscaled.
    """

    images: tf.Tensor
    labels: tf.Tensor
    noise: tf.Tensor
    num_copies: int
    training: bool
    step: Any
    seed: int
    values: Mapping[str, tf.Variable]
    base_model: keras.Model
    cross_entropy: Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]

    def forward(self, inputs: tf.Tensor) -> tf.Tensor:
        """The base classifier's logits, in training mode in a training step."""
        return self.base_model(inputs, training=self.training)

    def noisy(self, images: tf.Tensor) -> tf.Tensor:
        """The m noisy copies of `images` [B, ...] with this step's noise, copy-major."""
        return noise_lib.tile_copies(images, self.num_copies) + self.noise


@dataclasses.dataclass(frozen=True)
class Objective(abc.ABC):
    """A training method: its settings (the fields) and what it minimizes.

    Attributes:
      sigma: noise standard deviation, in [0, 1] pixel units.
      weight_decay: coupled L2 weight decay (PyTorch SGD's `weight_decay`):
        the wrapper adds weight_decay / 2 * ||w||^2 over the trainable weights.
      num_noise: m, noisy copies per clean image (each subclass states it).
    """

    sigma: float
    weight_decay: float

    name: ClassVar[str]
    term_names: ClassVar[Tuple[str, ...]]

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in _RANGES and value is not None:
                op, bound, note = _RANGES[field.name]
                check(value > bound if op == ">" else value >= bound,
                      f"{_label(field.name)} must be {op} {bound}{note}, got {value}")

    @property
    def adversarial(self) -> bool:
        """Whether each training step first attacks the inputs with SmoothAdv."""
        return False

    def epoch_values(self, epoch: Optional[int] = None) -> Dict[str, float]:
        """Its values at the (0-based) epoch, as the authors' loops set them; None: after warm-up and deferral."""
        del epoch
        return {}

    @abc.abstractmethod
    def terms(self, step: Step) -> Dict[str, tf.Tensor]:
        """The objective on one local batch.

        Returns:
          dict with "loss" (the objective, a local mean, unscaled), each of
          `term_names`, and "logits" [m * B, C] of the noisy copies,
          copy-major (for the accuracy).
        """


def _noisy_cross_entropy(step: Step, images: tf.Tensor) -> Dict[str, tf.Tensor]:
    """Cross-entropy over the m noisy copies of `images` (Cohen et al.), with their logits."""
    noisy = step.noisy(images)
    logits = step.forward(noisy)
    cross_entropy = step.cross_entropy(noisy, noise_lib.tile_copies(step.labels, step.num_copies), logits)
    return {"logits": logits, "cross_entropy": cross_entropy, "loss": cross_entropy}


def _smoothadv_images(step: Step, num_steps: int) -> tf.Tensor:
    """SmoothAdv's attack on the smoothed classifier, within the epoch's radius (`attack_radius`).

    The attack sees the model in inference mode and the same noise the copies
    get; no gradient reaches the weights through it.
    """
    from tf_consreg import attacks  # pylint: disable=import-outside-toplevel
    return attacks.smoothadv_pgd(step.base_model, step.images, step.labels, tf.split(step.noise, step.num_copies),
                                 epsilon=step.values["attack_radius"], num_steps=num_steps)


def _smoothadv_radius(epsilon: float, warmup: int, epoch: Optional[int]) -> Dict[str, float]:
    """SmoothAdv's radius grows as min(epsilon, (epoch + 1) * epsilon / warmup)."""
    return {"attack_radius": epsilon if epoch is None else min(epsilon, (epoch + 1) * epsilon / warmup)}


@dataclasses.dataclass(frozen=True)
class Gaussian(Objective):
    """Mean cross-entropy over the noisy copies (Cohen et al., 2019)."""

    num_noise: int

    name: ClassVar[str] = "gaussian"
    term_names: ClassVar[Tuple[str, ...]] = ("cross_entropy",)

    def terms(self, step: Step) -> Dict[str, tf.Tensor]:
        return _noisy_cross_entropy(step, step.images)


@dataclasses.dataclass(frozen=True)
class Consistency(Objective):
    """Cross-entropy over the copies plus `losses.consistency_loss` (Jeong & Shin, 2020).

    Attributes:
      lbd: weight of the consistency term's KL.
      eta: weight of its entropy.
      consistency_loss: its form (`CONSISTENCY_LOSSES`).
      adv_training: attack with SmoothAdv first, the paper's "SmoothAdv +
        Consistency" (train_consistency.py); then epsilon, num_steps and
        warmup are the attack's (see `SmoothAdv`), else None.
    """

    num_noise: int
    lbd: float
    eta: float
    consistency_loss: str
    adv_training: bool = False
    epsilon: Optional[float] = None
    num_steps: Optional[int] = None
    warmup: Optional[int] = None

    name: ClassVar[str] = "consistency"
    term_names: ClassVar[Tuple[str, ...]] = ("cross_entropy", "consistency", "kl", "entropy")

    def __post_init__(self):
        super().__post_init__()
        check(self.consistency_loss in CONSISTENCY_LOSSES, f"--consistency_loss={self.consistency_loss!r} is "
              f"unknown; choose one of {', '.join(CONSISTENCY_LOSSES)}")
        if self.consistency_loss == "mse":
            check(self.num_noise == 2, f"--consistency_loss=mse needs --num_noise=2, got {self.num_noise}")
        attack = (self.epsilon, self.num_steps, self.warmup)
        check(all(v is not None for v in attack) if self.adv_training else all(v is None for v in attack),
              "--epsilon, --num_steps and --warmup are set with --adv_training, and only then")

    @property
    def adversarial(self) -> bool:
        return self.adv_training

    def epoch_values(self, epoch: Optional[int] = None) -> Dict[str, float]:
        return _smoothadv_radius(self.epsilon, self.warmup, epoch) if self.adv_training else {}

    def terms(self, step: Step) -> Dict[str, tf.Tensor]:
        from tf_consreg import losses  # pylint: disable=import-outside-toplevel
        images = _smoothadv_images(step, self.num_steps) if self.adv_training and step.training else step.images
        terms = _noisy_cross_entropy(step, images)
        chunks = tf.split(tf.cast(terms["logits"], tf.float32), self.num_noise, axis=0)
        parts = losses.consistency_terms(chunks)
        consistency = losses.combine_consistency_terms(parts, self.lbd, self.eta, loss=self.consistency_loss)
        terms.update(consistency=consistency, kl=tf.reduce_mean(parts["kl"]),
                     entropy=tf.reduce_mean(parts["entropy"]), loss=terms["loss"] + consistency)
        return terms


@dataclasses.dataclass(frozen=True)
class Stability(Objective):
    """Cross-entropy on the clean image plus lbd times `losses.stability_loss` on one noisy copy (Li et al., 2019)."""

    num_noise: int
    lbd: float

    name: ClassVar[str] = "stability"
    term_names: ClassVar[Tuple[str, ...]] = ("cross_entropy", "stability")

    def __post_init__(self):
        super().__post_init__()
        check(self.num_noise == 1, "--method=stability draws one noise per image: --num_noise must be 1, "
              f"got {self.num_noise}")

    def terms(self, step: Step) -> Dict[str, tf.Tensor]:
        from tf_consreg import losses  # pylint: disable=import-outside-toplevel
        logits = step.forward(step.noisy(step.images))
        clean_logits = step.forward(step.images)
        cross_entropy = step.cross_entropy(step.images, step.labels, clean_logits)
        stability = losses.stability_loss(clean_logits, tf.cast(logits, clean_logits.dtype))
        return {"logits": logits, "cross_entropy": cross_entropy, "stability": stability,
                "loss": cross_entropy + self.lbd * stability}


@dataclasses.dataclass(frozen=True)
class SmoothAdv(Objective):
    """Cross-entropy on x' + noise, x' SmoothAdv's attack on the smoothed classifier (Salman et al., 2019).

    The attack holds the copies' noise fixed. Evaluation does not attack.

    Attributes:
      epsilon: the attack's L2 radius, in [0, 1] pixel units.
      num_steps: its PGD steps.
      warmup: the epochs over which the radius grows linearly to `epsilon`.
    """

    num_noise: int
    epsilon: float
    num_steps: int
    warmup: int

    name: ClassVar[str] = "smoothadv"
    term_names: ClassVar[Tuple[str, ...]] = ("cross_entropy",)

    @property
    def adversarial(self) -> bool:
        return True

    def epoch_values(self, epoch: Optional[int] = None) -> Dict[str, float]:
        return _smoothadv_radius(self.epsilon, self.warmup, epoch)

    def terms(self, step: Step) -> Dict[str, tf.Tensor]:
        return _noisy_cross_entropy(step, _smoothadv_images(step, self.num_steps) if step.training else step.images)


@dataclasses.dataclass(frozen=True)
class Macer(Objective):
    """`losses.macer_loss` on the K = `num_noise` copies (Zhai et al., 2020).

    Attributes:
      lbd: weight of the robustness term.
      beta, gamma: the inverse softmax temperature and the hinge margin.
      deferred_epochs: the robustness weight is 0 for this many epochs first.
    """

    num_noise: int
    lbd: float
    beta: float
    gamma: float
    deferred_epochs: int

    name: ClassVar[str] = "macer"
    term_names: ClassVar[Tuple[str, ...]] = ("classification", "robustness")

    def epoch_values(self, epoch: Optional[int] = None) -> Dict[str, float]:
        return {"robust_weight": 0.0 if epoch is not None and epoch < self.deferred_epochs else self.lbd}

    def terms(self, step: Step) -> Dict[str, tf.Tensor]:
        from tf_consreg import losses  # pylint: disable=import-outside-toplevel
        logits = step.forward(step.noisy(step.images))
        per_copy = tf.reshape(tf.cast(logits, tf.float32), [self.num_noise, -1, tf.shape(logits)[-1]])
        parts = losses.macer_loss(tf.transpose(per_copy, [1, 0, 2]), step.labels, sigma=self.sigma, lbd=1.0,
                                  beta=self.beta, gamma=self.gamma)
        return {"logits": logits, "classification": parts["classification"], "robustness": parts["robustness"],
                "loss": parts["classification"] + step.values["robust_weight"] * parts["robustness"]}


# SmoothMix's mixing weights: streams 3 and 4 of the run's seed (the wrapper's
# noise takes 1 and 2).
_TRAIN_MIX, _EVAL_MIX = 3, 4


@dataclasses.dataclass(frozen=True)
class SmoothMix(Objective):
    """`losses.smoothmix_loss` on an adversarial walk (Jeong et al., 2021).

    Cross-entropy on the copies of a start point s (x, or the one-step
    adversary), plus eta times the masked KL term on the copies of a mix of s
    with the end of `attacks.smoothmix_pgd`'s walk, the same m noises in the
    walk and in both forward passes, the mixing weight drawn per example in
    [0, 1/2). Evaluation does not attack (as SmoothAdv's): s and the end are
    x, so `val_mixup` measures the copies at x against the target.

    Attributes:
      eta: weight of the mixup term; warmed up.
      num_steps: T, the walk's steps.
      warmup: the epochs over which eta and maxnorm_s grow linearly.
      attack_step: the walk's step length, L2 in [0, 1] pixel units (the
        authors' --alpha).
      mix_step: the start point: 0 the clean image, 1 the one-step adversary.
      maxnorm, maxnorm_s: L2 bounds around the clean image of the walk and of
        the start point; None means unbounded, and attack_step * mix_step.
        maxnorm_s is warmed up with eta, maxnorm is not (as the authors').
    """

    num_noise: int
    eta: float
    num_steps: int
    warmup: int
    attack_step: float
    mix_step: int
    maxnorm: Optional[float] = None
    maxnorm_s: Optional[float] = None

    name: ClassVar[str] = "smoothmix"
    # mixup_fraction: the examples in the mixup's mask (smoothed prediction correct).
    term_names: ClassVar[Tuple[str, ...]] = ("cross_entropy", "mixup", "mixup_fraction")

    def __post_init__(self):
        super().__post_init__()
        check(self.mix_step in (0, 1), "--mix_step must be 0 (start at the clean image) or 1 (at the one-step "
              f"adversary), got {self.mix_step}")

    def epoch_values(self, epoch: Optional[int] = None) -> Dict[str, float]:
        """eta and the start-point bound times min(1, (epoch + 1) / warmup)."""
        full_start_bound = self.attack_step * self.mix_step if self.maxnorm_s is None else self.maxnorm_s
        if epoch is None:
            return {"mixup_weight": self.eta, "start_bound": full_start_bound}
        warmup = min(1.0, (epoch + 1) / self.warmup)
        return {"mixup_weight": warmup * self.eta, "start_bound": warmup * full_start_bound}

    def _mix_weights(self, step: Step) -> tf.Tensor:
        """The mixing weights, uniform in [0, 1/2), one per example, keyed like the noise."""
        seeds = noise_lib.example_seeds(
            noise_lib.step_seed(step.seed, _TRAIN_MIX if step.training else _EVAL_MIX, step.step),
            tf.shape(step.images)[0])
        return 0.5 * tf.map_fn(lambda seed: tf.random.stateless_uniform([], seed), seeds,
                               fn_output_signature=tf.float32)

    def terms(self, step: Step) -> Dict[str, tf.Tensor]:
        from tf_consreg import attacks  # pylint: disable=import-outside-toplevel
        from tf_consreg import losses  # pylint: disable=import-outside-toplevel
        m = self.num_noise
        start = end = step.images
        if step.training:  # In inference mode, with the copies' noise, as SmoothAdv's.
            start, end = attacks.smoothmix_pgd(
                step.base_model, step.images, step.labels, tf.split(step.noise, m), step_size=self.attack_step,
                num_steps=self.num_steps, mix_step=self.mix_step, maxnorm=self.maxnorm,
                maxnorm_s=step.values["start_bound"])
        logits = step.forward(step.noisy(start))
        # A second, separate forward pass (its own BatchNorm statistics, as the
        # authors') on the mixes' copies.
        mix_weights = self._mix_weights(step)
        mixed_logits = step.forward(step.noisy(attacks.smoothmix_inputs(start, end, mix_weights)))
        parts = losses.smoothmix_loss(tf.split(tf.cast(logits, tf.float32), m),
                                      tf.split(tf.cast(mixed_logits, tf.float32), m), step.labels, mix_weights,
                                      eta=step.values["mixup_weight"])
        return {"logits": logits, "cross_entropy": parts["cross_entropy"], "mixup": parts["mixup"],
                "mixup_fraction": parts["correct"], "loss": parts["total"]}


@dataclasses.dataclass(frozen=True)
class Standard(Objective):
    """Cross-entropy on the clean images: a classifier trained without noise.

    `sigma` only sets the run's certification default; the wrapper's noise
    is drawn and unused. The reported accuracy is the clean one.
    """

    num_noise: int

    name: ClassVar[str] = "standard"
    term_names: ClassVar[Tuple[str, ...]] = ("cross_entropy",)

    def __post_init__(self):
        super().__post_init__()
        check(self.num_noise == 1, f"--method=standard trains on clean images: --num_noise must be 1, "
              f"got {self.num_noise}")

    def terms(self, step: Step) -> Dict[str, tf.Tensor]:
        logits = step.forward(step.images)
        cross_entropy = step.cross_entropy(step.images, step.labels, logits)
        return {"logits": logits, "cross_entropy": cross_entropy, "loss": cross_entropy}


# Denoise's consistency objective weighs the KL by lbd; this is lbd's default
# (Consistency's, the authors' CIFAR-10 and ImageNet value).
DENOISE_CONSISTENCY_LBD = 10.0


@dataclasses.dataclass(frozen=True)
class Denoise(Objective):
    """A denoiser D trained in front of a frozen classifier f (denoised smoothing, Salman et al., 2020).

    The base model is the composition f∘D (`denoise.compose`); only D's
    weights train (f is not trainable, and runs in inference mode). With
    y = argmax f(x) the frozen classifier's label of the clean image, over
    the m noisy copies x + δ_i:

    * mse: mean over pixels of (D(x + δ_i) - x)^2 (Salman et al.'s
      "denoising");
    * stability: cross-entropy of f(D(x + δ_i)) against y (their
      "stability": their target is f(x)'s argmax);
    * consistency: the stability cross-entropy plus lbd * mean_i
      KL(p̄ ‖ p_i), p_i = softmax f(D(x + δ_i)), p̄ their mean (the KL
      term of `Consistency`, without its entropy).

    Attributes:
      denoise_objective: one of `DENOISE_OBJECTIVES`.
      classifier: the frozen classifier's .keras file.
      denoiser_arch: a name of `models.denoisers.DENOISERS`; None until
        the run's config sets the dataset's default.
      num_noise: m; default 2 for consistency (it compares copies), else 1.
      lbd: consistency's KL weight (default `DENOISE_CONSISTENCY_LBD`);
        None for the others.
    """

    denoise_objective: str
    classifier: Optional[str]
    denoiser_arch: Optional[str]
    num_noise: Optional[int] = None
    lbd: Optional[float] = None

    name: ClassVar[str] = "denoise"
    term_names: ClassVar[Tuple[str, ...]] = ("mse", "cross_entropy", "kl")

    def __post_init__(self):
        check(self.denoise_objective in DENOISE_OBJECTIVES, f"--denoise_objective={self.denoise_objective!r} is "
              f"unknown; choose one of {', '.join(DENOISE_OBJECTIVES)}")
        consistency = self.denoise_objective == "consistency"
        if self.num_noise is None:
            object.__setattr__(self, "num_noise", 2 if consistency else 1)
        if consistency:
            check(self.num_noise >= 2, f"--denoise_objective=consistency compares noisy copies: --num_noise must "
                  f"be >= 2, got {self.num_noise}")
            if self.lbd is None:
                object.__setattr__(self, "lbd", DENOISE_CONSISTENCY_LBD)
        else:
            check(self.lbd is None, f"--lbd is used only by --denoise_objective=consistency; remove it for "
                  f"--denoise_objective={self.denoise_objective}")
        check(bool(self.classifier), "--method=denoise needs --classifier: the frozen classifier's .keras file")
        super().__post_init__()

    def terms(self, step: Step) -> Dict[str, tf.Tensor]:
        from tf_consreg import denoise  # pylint: disable=import-outside-toplevel
        from tf_consreg import losses  # pylint: disable=import-outside-toplevel
        denoiser, classifier = denoise.parts(step.base_model)
        m = self.num_noise
        denoised = denoiser(step.noisy(step.images), training=step.training)
        logits = classifier(denoised, training=False)
        # The target: the frozen classifier's label of the clean image (no gradient reaches f's weights anyway).
        target = tf.argmax(tf.stop_gradient(classifier(step.images, training=False)), axis=-1, output_type=tf.int32)
        cross_entropy = step.cross_entropy(denoised, noise_lib.tile_copies(target, m), logits)
        mse = tf.reduce_mean(tf.square(tf.cast(denoised, tf.float32) - noise_lib.tile_copies(step.images, m)))
        kl = tf.reduce_mean(losses.consistency_terms(tf.split(tf.cast(logits, tf.float32), m))["kl"])
        loss = {"mse": mse, "stability": cross_entropy,
                "consistency": cross_entropy + (self.lbd or 0.0) * kl}[self.denoise_objective]
        return {"logits": logits, "mse": mse, "cross_entropy": cross_entropy, "kl": kl, "loss": loss}


@dataclasses.dataclass(frozen=True)
class Method:
    """A row of the registry: a method's objective and the authors' defaults of its settings.

    Attributes:
      objective: its class.
      defaults: each setting of the objective but sigma and weight_decay ->
        the value the authors' code uses (None: unset, with the meaning
        the objective gives it).
    """

    objective: Type[Objective]
    defaults: Mapping[str, Any]


# The authors' train_*.py defaults (epsilon in [0, 1] pixel units: their
# --epsilon divided by 256) and SmoothMix's code/train.py (attack_step: their
# --alpha, already in those units; maxnorm and maxnorm_s None: unbounded, and
# attack_step * mix_step).
REGISTRY: Dict[str, Method] = {
    "gaussian": Method(Gaussian, {"num_noise": 1}),
    "consistency": Method(Consistency, {"num_noise": 2, "lbd": 10.0, "eta": 0.5, "consistency_loss": "default"}),
    "stability": Method(Stability, {"num_noise": 1, "lbd": 2.0}),
    "smoothadv": Method(SmoothAdv, {"num_noise": 1, "epsilon": 64 / 256, "num_steps": 10, "warmup": 1}),
    "macer": Method(Macer, {"num_noise": 16, "lbd": 16.0, "beta": 16.0, "gamma": 8.0, "deferred_epochs": 0}),
    "smoothmix": Method(SmoothMix, {"num_noise": 1, "eta": 1.0, "num_steps": 8, "warmup": 10, "attack_step": 1.0,
                                    "mix_step": 0, "maxnorm": None, "maxnorm_s": None}),
    "standard": Method(Standard, {"num_noise": 1}),
    # Salman et al.'s train_denoiser.py defaults: --objective=denoising (our mse), and its CIFAR-10 DnCNN.
    # denoiser_arch None: the dataset's (run_config.TrainConfig sets it, `denoise.default_denoiser_arch`).
    "denoise": Method(Denoise, {"denoise_objective": "mse", "classifier": None, "denoiser_arch": None,
                                "num_noise": None, "lbd": None}),
}
METHODS = tuple(REGISTRY)
# SmoothAdv before the consistency objective: --method=consistency
# --adv_training, the paper's "SmoothAdv + Consistency" (train_consistency.py).
ADV_TRAINING_METHOD = "consistency"
ADV_TRAINING_DEFAULTS = {"epsilon": 512 / 256, "num_steps": 4, "warmup": 10}


def defaults(method: str, adv_training: bool = False) -> Dict[str, Any]:
    """The settings `method` uses (with `adv_training`) and the authors' defaults of each.

    Raises:
      ConfigError: an unknown method.
    """
    check(method in REGISTRY, f"--method={method!r} is unknown; choose one of {', '.join(METHODS)}")
    extra = ADV_TRAINING_DEFAULTS if adv_training and method == ADV_TRAINING_METHOD else {}
    return {**REGISTRY[method].defaults, **extra}


def used_by(name: str) -> str:
    """The methods that use a setting, as flags: "--method=a or --method=b"."""
    users = [f"--method={method}" for method, row in REGISTRY.items() if name in row.defaults]
    if name in ADV_TRAINING_DEFAULTS:
        users.append(f"--method={ADV_TRAINING_METHOD} --adv_training")
    return " or ".join(users)


def create(method: str, *, sigma: float, weight_decay: float = 1e-4, adv_training: bool = False,
           **settings) -> Objective:
    """The objective of `method`: the given settings, the authors' defaults for the others.

    Args:
      method: a name of `REGISTRY`.
      sigma: noise standard deviation, in [0, 1] pixel units.
      weight_decay: coupled L2 weight decay.
      adv_training: SmoothAdv before the consistency objective (that method only).
      **settings: the method's settings (see its class); None keeps the default.

    Raises:
      ConfigError: an unknown method, a setting it does not use, or a bad value.
    """
    fields = defaults(method, adv_training)
    check(not adv_training or method == ADV_TRAINING_METHOD,
          f"--adv_training combines SmoothAdv with --method={ADV_TRAINING_METHOD}; for --method={method} use "
          "--method=smoothadv or drop --adv_training")
    for name, value in settings.items():
        if name not in fields:
            if value is None:
                continue
            raise ConfigError(f"{_label(name)} is used only by {used_by(name)}; remove it for --method={method}")
        if value is not None:
            fields[name] = value
    if adv_training:
        fields["adv_training"] = True
    return REGISTRY[method].objective(sigma=sigma, weight_decay=weight_decay, **fields)
