r"""Trains a base classifier for randomized smoothing, with consistency regularization or a baseline.

Each clean image of a batch becomes --num_noise (m) noisy copies
x + N(0, sigma^2 I); the loss is the mean cross-entropy over all copies plus,
for --method=consistency, lambda * mean_i KL(p_mean || p_i) + eta * H(p_mean)
(Jeong & Shin, NeurIPS 2020). --method=gaussian is Gaussian augmentation
(Cohen et al., 2019). The run directory gets the resolved flags, TensorBoard
events, a checkpoint per epoch and the trained `base_model.keras`; running the
same command again resumes from the last checkpoint.

Example (the paper's MNIST setting at sigma = 0.50, on Fashion-MNIST):

  python bin/train.py --dataset=fashion_mnist --arch=lenet --method=consistency \
      --sigma=0.5 --num_noise=2 --lbd=5 --eta=0.5 --epochs=90 --batch_size=256 \
      --lr=0.01 --lr_step_size=30 --model_dir=runs/fmnist_consistency_0.50

  python bin/train.py --flagfile=configs/mnist_consistency_sigma0.50.flags \
      --model_dir=runs/mnist_consistency_0.50

On several machines (the same command on each; TF_CONFIG gives each its index,
see the README's "Running on a cluster"):

  TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]}, "task": {"type": "worker", "index": 0}}' \
  python bin/train.py --strategy=multi_worker --flagfile=configs/mnist_consistency_sigma0.50.flags \
      --model_dir=runs/mnist_consistency_0.50
"""

from absl import flags

from tf_consreg import cli  # Sets TensorFlow's environment before TensorFlow loads.
from tf_consreg import training as config_lib

_MODEL_DIR = flags.DEFINE_string("model_dir", None, "Run directory: flags, checkpoints, TensorBoard logs, "
                                 "base_model.keras. An existing run with the same flags resumes.")
_DATASET = flags.DEFINE_string("dataset", "fashion_mnist", "Dataset: fashion_mnist, mnist, cifar10 or "
                               "imagenet2012.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Directory with the Fashion-MNIST IDX files, or a "
                                "tensorflow-datasets data directory (ImageNet: the archives go in "
                                "<data_dir>/downloads/manual). Default: Debian's dataset-fashion-mnist files, then "
                                "~/tensorflow_datasets.")
_MOCK_DATA = flags.DEFINE_bool("mock_data", False, "Train and evaluate on random images of the dataset's shape "
                               "instead of the dataset: smoke runs on machines without the data.")
_ARCH = flags.DEFINE_string("arch", "lenet", "Architecture (see tf_consreg.models.ARCHITECTURES).")
_METHOD = flags.DEFINE_string(
    "method", "consistency", "consistency: cross-entropy + consistency term (Jeong & Shin 2020); gaussian: "
    "cross-entropy on noisy copies (Cohen et al. 2019); stability: clean cross-entropy + lbd * stability term "
    "(Li et al. 2019); smoothadv: cross-entropy on SmoothAdv attacks (Salman et al. 2019); macer: MACER "
    "(Zhai et al. 2020). Flags a method does not use are refused.")
_SIGMA = flags.DEFINE_float("sigma", 0.25, "Noise standard deviation, in [0, 1] pixel units.")
_NUM_NOISE = flags.DEFINE_integer("num_noise", None, "m: noisy copies per clean image (K for macer). Default: "
                                  "2 for consistency, 16 for macer, 1 otherwise (stability needs 1).")
_LBD = flags.DEFINE_float("lbd", None, "lambda, weight of the regularizer: consistency (default 10), stability "
                          "(default 2) or macer's robustness term (default 16).")
_ETA = flags.DEFINE_float("eta", None, "eta, weight of the entropy term (consistency only; default 0.5).")
_BETA = flags.DEFINE_float("beta", None, "MACER's inverse softmax temperature (macer only; default 16).")
_GAMMA = flags.DEFINE_float("gamma", None, "MACER's hinge margin (macer only; default 8).")
_DEFERRED = flags.DEFINE_bool("deferred", None, "MACER: keep the robustness weight at 0 until the first "
                              "learning-rate drop, as the authors' MNIST runs (macer only).")
_ADV_TRAINING = flags.DEFINE_bool("adv_training", False, "With --method=consistency: attack each batch with "
                                  "SmoothAdv first (the paper's 'SmoothAdv + Consistency').")
_EPSILON = flags.DEFINE_float("epsilon", None, "SmoothAdv's L2 radius in [0, 1] pixel units (the authors' "
                              "--epsilon divided by 256: 255 -> 0.996). Default 0.25 for smoothadv, 2.0 with "
                              "--adv_training.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "SmoothAdv's PGD steps (default 10 for smoothadv, 4 with "
                                  "--adv_training).")
_WARMUP = flags.DEFINE_integer("warmup", None, "Epochs over which SmoothAdv's radius grows linearly to "
                               "--epsilon (default 1 for smoothadv, 10 with --adv_training).")
_CONSISTENCY_LOSS = flags.DEFINE_string(
    "consistency_loss", None,
    "Form of the consistency term (consistency only; default 'default'): default = lbd*KL + eta*H, "
    "xent = lbd*(KL + H), kl = lbd*KL, mse = lbd*||p2 - p1||^2 (m = 2).")
_EPOCHS = flags.DEFINE_integer("epochs", 90, "Training epochs.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 256, "CLEAN images per optimizer step; each step trains on m times as many noisy copies. "
    "With --batch_split, the images loaded per step of the authors' loader instead (see there).")
_BATCH_SPLIT = flags.DEFINE_bool(
    "batch_split", False, "The authors' batching: split each loaded batch of --batch_size images into m chunks "
    "and take one optimizer step per chunk, so a step sees batch_size/m clean images and batch_size noisy "
    "copies. Use it to reproduce the paper's settings.")
_LR = flags.DEFINE_float("lr", 0.01, "Initial learning rate of SGD.")
_LR_STEP_SIZE = flags.DEFINE_integer("lr_step_size", 30, "Multiply the learning rate by --lr_gamma every this "
                                     "many epochs.")
_LR_GAMMA = flags.DEFINE_float("lr_gamma", 0.1, "Learning-rate decay factor.")
_MOMENTUM = flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 1e-4, "L2 weight decay, coupled as in PyTorch's SGD.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the noise, the shuffling and the initialization.")
_TRAIN_EXAMPLES = flags.DEFINE_integer("train_examples", 0, "Use only the first N training images (0 = all; "
                                       "with --certify_every, all but the held-out ones).")
_EVAL_EXAMPLES = flags.DEFINE_integer("eval_examples", 10000, "Test images for the per-epoch noisy accuracy "
                                      "(0 = no evaluation).")
_CERTIFY_EVERY = flags.DEFINE_integer(
    "certify_every", 0, "Every this many epochs (and after the last), certify --certify_examples images held "
    "out of the END of the training split (never trained on) and log val/acr, certified accuracy, the "
    "abstention rate and the certified-accuracy curve to TensorBoard, and val_acr to the epoch logs. 0 = off.")
_CERTIFY_EXAMPLES = flags.DEFINE_integer("certify_examples", None, "With --certify_every: images held out of "
                                         "the end of the training split (default 200).")
_CERTIFY_N0 = flags.DEFINE_integer("certify_n0", None, "With --certify_every: CERTIFY's selection samples "
                                   "(default 100).")
_CERTIFY_N = flags.DEFINE_integer("certify_n", None, "With --certify_every: CERTIFY's estimation samples "
                                  "(default 1000).")
_CERTIFY_ALPHA = flags.DEFINE_float("certify_alpha", None, "With --certify_every: CERTIFY's failure "
                                    "probability (default 0.001).")
_CERTIFY_BATCH_SIZE = flags.DEFINE_integer("certify_batch_size", None, "With --certify_every: noisy copies "
                                           "per forward pass (default 1000).")
_STRATEGY = flags.DEFINE_string(
    "strategy", "auto", "auto, default, mirrored or multi_worker. auto: MirroredStrategy when more than one GPU is "
    "visible, else one device. multi_worker: MultiWorkerMirroredStrategy over the cluster in the TF_CONFIG "
    "environment variable; run the same command on every worker (the chief writes --model_dir).")
_STEPS_PER_EXECUTION = flags.DEFINE_integer("steps_per_execution", 1, "Training steps per compiled call.")
_MIXED_PRECISION = flags.DEFINE_string(
    "mixed_precision", "none", "none, mixed_float16 (with dynamic loss scaling) or mixed_bfloat16: layers "
    "compute in 16 bits, variables, logits and every loss term stay float32. For GPUs and TPUs; on a CPU it is "
    "slower.")
_JIT_COMPILE = flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA. Measure first: on CPUs "
                                 "it made LeNet slower, and Keras turns it off under tf.distribute.")
_PRETRAINED_MODEL = flags.DEFINE_string(
    "pretrained_model", None, "Start from this base_model.keras of the same --arch (fine-tuning); when its "
    "class count differs from --dataset's, the classifier layer is replaced by a fresh one.")

_HANDLES = (_MODEL_DIR, _DATASET, _DATA_DIR, _ARCH, _METHOD, _SIGMA, _NUM_NOISE, _LBD, _ETA, _CONSISTENCY_LOSS,
            _BETA, _GAMMA, _DEFERRED, _ADV_TRAINING, _EPSILON, _NUM_STEPS, _WARMUP,
            _EPOCHS, _BATCH_SIZE, _BATCH_SPLIT, _LR, _LR_STEP_SIZE, _LR_GAMMA, _MOMENTUM, _WEIGHT_DECAY, _SEED,
            _TRAIN_EXAMPLES, _EVAL_EXAMPLES, _CERTIFY_EVERY, _CERTIFY_EXAMPLES, _CERTIFY_N0, _CERTIFY_N, _CERTIFY_ALPHA,
            _CERTIFY_BATCH_SIZE, _MOCK_DATA, _STRATEGY, _STEPS_PER_EXECUTION, _MIXED_PRECISION, _JIT_COMPILE,
            _PRETRAINED_MODEL)


def flags_text() -> str:
    """The resolved flags as a flagfile (`--flagfile=` accepts it unchanged)."""
    return "".join(flags.FLAGS[h.name].serialize() + "\n" for h in _HANDLES if h.value is not None)


def make_config() -> config_lib.TrainConfig:
    """Builds the validated config from the flags."""
    if not _MODEL_DIR.value:
        raise config_lib.ConfigError("--model_dir is required: the directory for checkpoints, logs and the model")
    return config_lib.TrainConfig(
        model_dir=_MODEL_DIR.value, dataset=_DATASET.value, arch=_ARCH.value, method=_METHOD.value,
        sigma=_SIGMA.value, num_noise=_NUM_NOISE.value, lbd=_LBD.value, eta=_ETA.value,
        consistency_loss=_CONSISTENCY_LOSS.value, beta=_BETA.value, gamma=_GAMMA.value, deferred=_DEFERRED.value,
        adv_training=_ADV_TRAINING.value, epsilon=_EPSILON.value, num_steps=_NUM_STEPS.value, warmup=_WARMUP.value,
        epochs=_EPOCHS.value, batch_size=_BATCH_SIZE.value,
        batch_split=_BATCH_SPLIT.value, lr=_LR.value, lr_step_size=_LR_STEP_SIZE.value, lr_gamma=_LR_GAMMA.value,
        momentum=_MOMENTUM.value, weight_decay=_WEIGHT_DECAY.value, seed=_SEED.value,
        train_examples=_TRAIN_EXAMPLES.value, eval_examples=_EVAL_EXAMPLES.value, certify_every=_CERTIFY_EVERY.value,
        certify_examples=_CERTIFY_EXAMPLES.value, certify_n0=_CERTIFY_N0.value, certify_n=_CERTIFY_N.value,
        certify_alpha=_CERTIFY_ALPHA.value, certify_batch_size=_CERTIFY_BATCH_SIZE.value,
        data_dir=_DATA_DIR.value, mock_data=_MOCK_DATA.value,
        strategy=_STRATEGY.value, steps_per_execution=_STEPS_PER_EXECUTION.value,
        mixed_precision=_MIXED_PRECISION.value, jit_compile=_JIT_COMPILE.value,
        pretrained_model=_PRETRAINED_MODEL.value)


def main(argv):
    del argv
    config = make_config()
    config_lib.train(config, flags_text=flags_text())


if __name__ == "__main__":
    cli.run(main)
