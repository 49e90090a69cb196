"""Training of smoothed classifiers: `train` runs what a `run_config.TrainConfig` says.

`train` builds the training wrapper (`consistency_model.ConsistencyModel`,
whose objective is the method's class of objectives.py) over a base
classifier, optionally loaded from a pretrained model, and runs the epochs:
checkpoints, resume, TensorBoard logs, live certification, multi-worker
clusters. It writes a run directory (its files are named in run_config). The
base classifier, not the wrapper, is what `train` saves, certifies and
exports.
"""

import contextlib
import dataclasses
import math
import os
import shutil
import sys
import tempfile
from typing import List, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from tf_consreg import callbacks as callbacks_lib
from tf_consreg import consistency_model
from tf_consreg import data as data_lib
from tf_consreg import denoise
from tf_consreg import distribute
from tf_consreg import files
from tf_consreg import models
from tf_consreg import multi_worker
from tf_consreg import precision
from tf_consreg import run_config
from tf_consreg.errors import ConfigError, check

# MACER's λ from which training from scratch without --deferred collapsed
# (issue 16: λ = 16, Fashion-MNIST, in 3 epochs, also with the authors' code).
MACER_UNDEFERRED_LBD = 8.0


def config_warnings(config: run_config.TrainConfig) -> List[str]:
    """One-line warnings about a valid config that is known to train badly.

    Args:
      config: the validated run configuration.

    Returns:
      The warnings, each one line naming the flags (empty when none applies).
    """
    objective = config.objective
    found = []
    if objective.method == "macer" and objective.lbd >= MACER_UNDEFERRED_LBD and not config.deferred:
        found.append(f"--method=macer with --lbd={objective.lbd:g} (>= {MACER_UNDEFERRED_LBD:g}) and no --deferred "
                     "tends to collapse to one class within a few epochs when trained from scratch (the authors' "
                     "code does too); the authors train MNIST MACER with --deferred")
    return found


# --------------------------------------------------------------------------
# The training run.


def _check_model_dir(config: run_config.TrainConfig) -> None:
    """Refuses a model_dir that holds another run, or other files (see `files.check_run_dir`).

    The same run, resumed, may train more epochs. `precision_policy` is not
    compared: `resolve_precision` keeps the recorded one (older records lack it).
    """
    here = config.to_dict()
    ignore = ("epochs", "model_dir", "precision_policy")
    files.check_run_dir(config.model_dir, run_config.TRAIN_CONFIG_FILE,
                        lambda there: files.differences(here, there, ignore),
                        flag="model_dir", kind="run", resume="the same flags to resume")


def _chief_precision(strategy: tf.distribute.Strategy, task: distribute.ClusterTask, config: run_config.TrainConfig,
                     reason: str) -> Tuple[run_config.TrainConfig, str]:
    """The config in the chief's precision policy, and the line to print, on every worker of a cluster.

    Workers may differ in hardware, so "auto" may resolve differently on
    each; one run computes in one policy, the one the chief records.
    """
    with strategy.scope():
        code = tf.Variable(precision.KERAS_POLICIES.index(config.precision_policy), dtype=tf.int64,
                           trainable=False, name="precision_policy")
    distribute.broadcast_from_first_replica(strategy, [code])
    chief = precision.KERAS_POLICIES[int(code.numpy())]
    if chief == config.precision_policy:
        return config, reason
    return (dataclasses.replace(config, precision_policy=chief),
            f"Worker {task.worker_index}: computing in {chief}, the chief's policy (here: {reason})")


def _learning_rate(config: run_config.TrainConfig, steps_per_epoch: int):
    """PyTorch's StepLR: lr * gamma ** (epoch // step_size), as a step schedule."""
    num_drops = (config.epochs - 1) // config.lr_step_size
    if num_drops == 0:
        return config.lr
    # The schedule sees the step count before the update, and keeps values[k]
    # while step <= boundaries[k]: so the last step of an lr period is the boundary.
    boundaries = [steps_per_epoch * config.lr_step_size * k - 1 for k in range(1, num_drops + 1)]
    values = [config.lr * config.lr_gamma ** k for k in range(num_drops + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def build(config: run_config.TrainConfig, steps_per_epoch: int) -> consistency_model.ConsistencyModel:
    """Builds and compiles the wrapper for `config`, in the current strategy's scope.

    It computes under `config.precision_policy`; an unresolved "auto" is
    resolved for this machine (`resolve_precision`).
    """
    policy = config.precision_policy or run_config.resolve_precision(config)[0].precision_policy
    # Layers take their dtype policy when they are created: set it for this
    # model only, so other models of the process keep theirs.
    previous_policy = keras.config.dtype_policy()
    if policy != "float32":
        keras.config.set_dtype_policy(policy)
    try:
        objective = config.objective
        if objective.method == "denoise":
            base = denoise.training_model(objective.denoiser_arch, objective.classifier, config.dataset)
        else:
            base = models.get_architecture(config.arch, config.dataset)
        if config.pretrained_model:
            load_pretrained(base, config.pretrained_model)
    finally:
        keras.config.set_dtype_policy(previous_policy)
    model = consistency_model.ConsistencyModel(base, config.objective, seed=config.seed, name="consistency_model")
    # SGD with momentum as torch.optim.SGD (weight decay is in the loss, coupled
    # as PyTorch applies it, rather than Keras's decoupled `weight_decay`).
    optimizer = keras.optimizers.SGD(learning_rate=_learning_rate(config, steps_per_epoch),
                                     momentum=config.momentum)
    if policy == "mixed_float16":
        # float16 gradients underflow without loss scaling; train_step calls
        # optimizer.scale_loss and `apply` unscales (and skips non-finite steps).
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=config.steps_per_execution, jit_compile=config.jit_compile)
    return model


def _leaf_layers(model: keras.Model) -> List[keras.layers.Layer]:
    layers = []
    for layer in model.layers:
        layers.extend(_leaf_layers(layer) if isinstance(layer, keras.Model) else [layer])
    return layers


def load_pretrained(base: keras.Model, path: str) -> None:
    """Copies a saved base model's weights into `base`, layer by layer.

    Both must be the same architecture. When their class counts differ, the
    classifier (the last Dense layer) keeps its fresh initialization, as the
    authors' fine-tuning replaces the `fc` layer.

    Raises:
      ConfigError: the saved model is not of `base`'s architecture.
    """
    try:
        pretrained = models.load_base_model(path)
    except ConfigError as e:
        raise ConfigError(f"--pretrained_model: {e}") from e
    new_layers, old_layers = _leaf_layers(base), _leaf_layers(pretrained)
    heads = [i for i, layer in enumerate(new_layers) if isinstance(layer, keras.layers.Dense)]
    replaced = None
    if len(new_layers) != len(old_layers) or not heads:
        raise ConfigError(f"--pretrained_model={path}: its layers do not match --arch's; use a model trained with "
                          "the same --arch")
    for i, (target, source) in enumerate(zip(new_layers, old_layers)):
        target_shapes = [tuple(w.shape) for w in target.weights]
        source_shapes = [tuple(w.shape) for w in source.weights]
        if target_shapes == source_shapes:
            target.set_weights(source.get_weights())
        elif i == heads[-1] and target_shapes[0][0] == source_shapes[0][0]:
            replaced = (source_shapes[-1][0], target_shapes[-1][0])
        else:
            raise ConfigError(f"--pretrained_model={path}: layer {source.name} has weights {source_shapes}, "
                              f"--arch's has {target_shapes}; use a model trained with the same --arch")
    print(f"Initialized from {path}" + (f" (new classifier: {replaced[0]} -> {replaced[1]} classes)"
                                        if replaced else ""))


def train(config: run_config.TrainConfig, extra_callbacks: Optional[List[keras.callbacks.Callback]] = None, *,
          capability: Optional[precision.Capability] = None) -> keras.callbacks.History:
    """Trains a base classifier as `config` says and saves it in `config.model_dir`.

    Writes `train_config.json`, `flags.txt` (`config.to_flags()`, for
    `bin/train.py --flagfile=`), TensorBoard events
    (`logs/`), a checkpoint per epoch (`checkpoints/`) and, at the end,
    `base_model.keras`. A second call with the same config resumes from the
    last checkpoint, and trains on when `epochs` grew. A call on a finished
    run (as many epochs done as `epochs`) leaves every file of the run as it
    is, byte for byte, and returns an empty History.

    Each epoch trains on batches drawn from (seed, epoch) alone
    (`data.Source.make_input`'s `epochs`), so a run stopped at an epoch's end
    and resumed trains on what the uninterrupted run would have: on one
    device it ends with bit-identical weights.

    Training stops with `callbacks.TrainingDivergedError` at the first
    non-finite loss, before anything of that epoch is saved. A fresh run
    that diverges before its first checkpoint leaves nothing in `model_dir`,
    so the corrected command may use it.

    With `strategy="multi_worker"`, every worker of the `TF_CONFIG` cluster
    calls this with the same config. The chief writes the files above; the
    other workers write theirs to a temporary directory they delete at the
    end, and start from the chief's checkpoint (see
    `multi_worker.share_chief_state`). Each worker prints a fingerprint of
    its final weights, equal on all of them.

    It first seeds Python, NumPy and TensorFlow with `config.seed`
    (`keras.utils.set_random_seed`), so the same config starts from the same
    initialization, in a fresh process or after other runs in this one.

    It then resolves the precision (`resolve_precision`: a resumed run keeps
    the policy it started with) and prints the choice and why; the run's
    record holds it (`precision_policy` in train_config.json, a comment in
    flags.txt). Under multi_worker every worker computes in the chief's
    policy, whatever its own hardware would choose.

    Args:
      config: the validated run configuration.
      extra_callbacks: more Keras callbacks (under multi_worker they run on
        every worker and must not stop training on one worker only).
      capability: the machine's bfloat16 capability, for "auto"; default:
        `precision.probe()`.

    Returns:
      The Keras `History` of this call.

    Raises:
      ConfigError: bad data files, an invalid `TF_CONFIG` or
        `--pretrained_model`, a `model_dir` that holds another run or more
        epochs than `epochs`; raised before anything is written.
      callbacks.TrainingDivergedError: the loss or the weights became
        non-finite (a `ConfigError` too).
    """
    keras.utils.set_random_seed(config.seed)
    task = distribute.cluster_task_from_env() if config.strategy == "multi_worker" else None
    batch = config.clean_batch_size
    if task is not None:
        multi_worker.check_batch_size(task, batch)
    # A resumed run keeps the policy it recorded (an unreadable record: _check_model_dir says so).
    recorded = files.read_json_object(os.path.join(config.model_dir, run_config.TRAIN_CONFIG_FILE))
    config, precision_reason = run_config.resolve_precision(config, recorded, capability)
    # Every worker checks (read only): on a shared file system they all see the chief's directory.
    _check_model_dir(config)
    done = _epochs_done(config.model_dir)
    check(done <= config.epochs, f"--epochs={config.epochs}: --model_dir={config.model_dir} already holds {done} "
          f"epochs of this run; resume it with --epochs={done} or more, or use a new --model_dir")
    is_chief = task is None or task.is_chief
    strategy = distribute.get_strategy(config.strategy)
    if task is not None:
        config, precision_reason = _chief_precision(strategy, task, config, precision_reason)
    print(precision_reason, flush=True)
    replicas = strategy.num_replicas_in_sync
    info = data_lib.get_dataset_info(config.dataset)
    certify = None
    if config.certify_every:
        # The held-out images are the LAST certify_examples of the whole
        # training split, whatever --train_examples is; they are never trained on.
        full = data_lib.open_source(config.dataset, "train", data_dir=config.data_dir, mock=config.mock_data)
        train_x, train_y, val_x, val_y = data_lib.holdout_split(
            full.images, full.labels, config.certify_examples, train_examples=config.train_examples)
        train_source = dataclasses.replace(full, num_examples=len(train_x), images=train_x, labels=train_y)
        if is_chief:
            # Under multi_worker the chief certifies while the others wait for
            # its next all-reduce: a cost in time, not in correctness.
            certify = callbacks_lib.CertifyCallback(
                val_x, val_y, spec=config.certify, num_classes=info.num_classes, every=config.certify_every,
                log_dir=os.path.join(config.model_dir, run_config.LOGS_DIR),
                seed=config.seed, image_ids=np.arange(full.num_examples - len(val_x), full.num_examples))
    else:
        train_source = data_lib.open_source(config.dataset, "train", data_dir=config.data_dir,
                                            limit=config.train_examples or None, mock=config.mock_data)
    eval_source = None
    if config.eval_examples:
        eval_source = data_lib.open_source(config.dataset, "test", data_dir=config.data_dir,
                                           limit=config.eval_examples, mock=config.mock_data)
    if replicas > 1 and batch % replicas:
        raise ConfigError(f"--batch_size: {batch} clean images per step do not split evenly over {replicas} replicas")
    # Equal local batches under several replicas (see noise.example_seeds).
    drop_remainder = replicas > 1
    num_train = train_source.num_examples
    steps_per_epoch = num_train // batch if drop_remainder else math.ceil(num_train / batch)
    if steps_per_epoch < 1:
        raise ConfigError(f"--train_examples: {num_train} images make no full batch of {batch}")
    if task is not None and eval_source is not None and eval_source.num_examples < batch:
        raise ConfigError(f"--eval_examples: {eval_source.num_examples} images make no full batch of {batch}")
    if task is None and steps_per_epoch % config.steps_per_execution:
        # fit takes whole calls of steps_per_execution steps from an input
        # that runs on into the next epoch: an epoch would take some of the next one's batches.
        raise ConfigError(f"--steps_per_execution={config.steps_per_execution} must divide the {steps_per_epoch} "
                          "steps of an epoch")

    # The chief writes the run; other workers write what they must (every
    # worker takes part in saving a checkpoint) to a directory of their own.
    with contextlib.ExitStack() as cleanup:
        if is_chief:
            work_dir = config.model_dir
        else:
            work_dir = tempfile.mkdtemp(prefix=f"tf_consreg_worker{task.worker_index}_")
            cleanup.callback(shutil.rmtree, work_dir, ignore_errors=True)
        history = _train_in(config, strategy, task, work_dir, train_source, eval_source, steps_per_epoch,
                            drop_remainder, [certify] if certify else [], extra_callbacks or [])
    return history


def _epochs_done(model_dir: str) -> int:
    """The epochs a run directory's last checkpoint holds (0 when it has none); reads only.

    Raises:
      ConfigError: the last checkpoint is unreadable.
    """
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, run_config.CHECKPOINT_DIR))
    if latest is None:
        return 0
    try:
        reader = tf.train.load_checkpoint(latest)
        names = [name for name in reader.get_variable_to_shape_map() if name.startswith("epoch/")]
        return int(reader.get_tensor(names[0])) if names else 0
    except (tf.errors.OpError, ValueError) as e:
        raise ConfigError(f"{latest}: the last checkpoint is unreadable ({type(e).__name__}: {e})") from e


def _record_run(config: run_config.TrainConfig) -> None:
    """Writes the run's `train_config.json` and `flags.txt`, each only when its content changes.

    A resumed run rewrites neither (their bytes and times stay); one whose
    `epochs` grew rewrites both.
    """
    os.makedirs(config.model_dir, exist_ok=True)
    for name, text in ((run_config.TRAIN_CONFIG_FILE, config.to_json()), (run_config.FLAGS_FILE, config.to_flags())):
        path = os.path.join(config.model_dir, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                if f.read() == text:
                    continue
        with files.atomic_output(path) as f:
            f.write(text)


def _forget_run(config: run_config.TrainConfig) -> None:
    """Removes what `_record_run` and a first epoch wrote, leaving `model_dir` empty (for a fresh run that diverged)."""
    for name in (run_config.TRAIN_CONFIG_FILE, run_config.FLAGS_FILE):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(config.model_dir, name))
    for name in (run_config.LOGS_DIR, run_config.CHECKPOINT_DIR):
        shutil.rmtree(os.path.join(config.model_dir, name), ignore_errors=True)


def _train_in(config: run_config.TrainConfig, strategy: tf.distribute.Strategy, task: Optional[distribute.ClusterTask],
              work_dir: str, train_source: data_lib.Source, eval_source: Optional[data_lib.Source],
              steps_per_epoch: int, drop_remainder: bool, certify: List[keras.callbacks.Callback],
              extra_callbacks: List[keras.callbacks.Callback]) -> keras.callbacks.History:
    """`train` once its checks are done: `work_dir` is the model_dir, or a non-chief's own directory.

    Nothing is written before the model is built (which loads
    `--pretrained_model`) and restored: a finished run is left as it is.
    """
    info = data_lib.get_dataset_info(config.dataset)
    batch = config.clean_batch_size
    is_chief = task is None or task.is_chief
    with strategy.scope():
        model = build(config, steps_per_epoch)
        model.build((None, *info.input_shape))
        model.optimizer.build(model.base_model.trainable_weights)
        epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer, epoch=epoch)
        # Created now on every worker: a variable created later on one worker
        # only (restoring creates it) would wait for the others' broadcast.
        _ = checkpoint.save_counter
        manager = tf.train.CheckpointManager(checkpoint, os.path.join(work_dir, run_config.CHECKPOINT_DIR),
                                             max_to_keep=3)
        _restore(model, checkpoint, manager, epoch, strategy, task, config.epochs)
    initial_epoch = int(epoch.numpy())
    base_model_path = os.path.join(config.model_dir, models.BASE_MODEL_FILE)
    if initial_epoch >= config.epochs:
        print(f"{config.model_dir} is already trained for {initial_epoch} epochs; nothing to do")
        if task is not None:
            multi_worker.print_final_weights(task, model.base_model)
        if is_chief and not os.path.isfile(base_model_path):  # Killed between the last checkpoint and the save.
            _save_models(config, model.base_model)
        return keras.callbacks.History()

    fresh = initial_epoch == 0
    if is_chief:
        _record_run(config)
    callbacks = [
        callbacks_lib.EpochSchedule(),
        # Before everything that certifies or saves the epoch.
        callbacks_lib.StopOnDivergence(advice=f"try a smaller --lr than {config.lr:g}"),
        callbacks_lib.Throughput(batch),
        # Adds val_acr & co. to the epoch logs: before everything that reads them.
        *certify,
        # After it: a kill during certification redoes that epoch.
        callbacks_lib.EpochCheckpoint(manager, epoch, keep=is_chief),
        callbacks_lib.ScalarLogger(os.path.join(work_dir, run_config.LOGS_DIR),
                                   update_freq=max(1, steps_per_epoch // 20)),
        *extra_callbacks,
    ]
    verbose = 1 if sys.stdout.isatty() else 2
    try:
        if task is not None:
            history = multi_worker.fit_cluster(model, strategy, train_source, eval_source, batch_size=batch,
                                               seed=config.seed, epochs=config.epochs, initial_epoch=initial_epoch,
                                               steps_per_epoch=steps_per_epoch, callbacks=callbacks,
                                               verbose=verbose)
        else:
            # Under several replicas each gets its share of every global batch, in order.
            input_strategy = strategy if strategy.num_replicas_in_sync > 1 else None
            train_input = train_source.make_input(batch, training=True, seed=config.seed,
                                                  epochs=range(initial_epoch, config.epochs),
                                                  drop_remainder=drop_remainder, strategy=input_strategy)
            eval_input = None
            if eval_source is not None:
                eval_input = eval_source.make_input(batch, training=False, drop_remainder=drop_remainder,
                                                    strategy=input_strategy)
            # The training input holds the remaining epochs one after another:
            # fit must be told where each ends.
            history = model.fit(train_input.dataset, epochs=config.epochs, initial_epoch=initial_epoch,
                                steps_per_epoch=steps_per_epoch,
                                validation_data=eval_input.dataset if eval_input else None,
                                validation_steps=eval_input.steps_per_epoch if eval_input and input_strategy else None,
                                callbacks=callbacks, shuffle=False, verbose=verbose)
    except callbacks_lib.TrainingDivergedError as e:
        if is_chief and fresh and manager.latest_checkpoint is None:
            _forget_run(config)
            raise callbacks_lib.TrainingDivergedError(
                f"{e}; --model_dir={config.model_dir} was left empty for the corrected command") from None
        raise
    if task is not None:
        multi_worker.print_final_weights(task, model.base_model)
    if is_chief:
        _save_models(config, model.base_model)
    return history


def _restore(model: "ConsistencyModel", checkpoint: tf.train.Checkpoint, manager: tf.train.CheckpointManager,
             epoch: tf.Variable, strategy: tf.distribute.Strategy, task: Optional[distribute.ClusterTask],
             epochs: int) -> None:
    """Restores the last checkpoint; under multi_worker, the chief's, on every worker.

    See `multi_worker.share_chief_state`.
    """
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        print(f"Resuming from {manager.latest_checkpoint} (epoch {int(epoch.numpy())} of {epochs})")
    if task is not None:
        multi_worker.share_chief_state(strategy, task, [*model.base_model.weights, *model.optimizer.variables,
                                                        model._eval_steps], epoch, epochs)


def _save_models(config: run_config.TrainConfig, base_model: keras.Model) -> None:
    """Saves the run's models: base_model.keras, and for --method=denoise the denoiser beside it.

    The denoiser goes first: a run killed between the two saves has no
    base_model.keras, so the next call saves both.
    """
    if config.objective.method == "denoise":
        save_base_model(denoise.parts(base_model)[0], config.model_dir, denoise.DENOISER_FILE)
    save_base_model(base_model, config.model_dir)


def save_base_model(base_model: keras.Model, model_dir: str, name: str = models.BASE_MODEL_FILE) -> str:
    """Writes `base_model` to `model_dir`/`name` (base_model.keras by default) atomically; returns its path."""
    path = os.path.join(model_dir, name)
    tmp = os.path.join(model_dir, ".tmp_" + name)
    base_model.save(tmp)
    os.replace(tmp, path)
    return path
