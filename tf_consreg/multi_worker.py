"""Multi-worker training: the loop that replaces `fit` under MultiWorkerMirroredStrategy.

Keras 3's `fit` fails under `MultiWorkerMirroredStrategy`
(keras-team/keras#20585, tensorflow/tensorflow#72388), so `training.train`
with `--strategy=multi_worker` trains through `fit_cluster`: every worker
builds the same global input and keeps its slice of each batch
(`_worker_slices`), and `fit_distributed` runs the model's own `train_step`
with the callbacks `fit` would call. Around it: the checks made before the
strategy waits for the cluster (`check_batch_size`), the chief's restored
state shared with every worker (`share_chief_state`), and the fingerprint
of the final weights each worker prints (`print_final_weights`).
"""

import hashlib
from typing import Callable, List, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from tf_consreg import data as data_lib
from tf_consreg import distribute
from tf_consreg.errors import ConfigError


def check_batch_size(task: distribute.ClusterTask, batch_size: int) -> None:
    """Refuses a global batch that does not split evenly over the cluster's replicas.

    Checked before the strategy waits for the cluster, so a bad flag fails at
    once instead of after every worker has joined.

    Raises:
      ConfigError: `batch_size` is not a multiple of the replica count.
    """
    replicas = task.num_workers * distribute.multi_worker_local_replicas()
    if batch_size % replicas:
        raise ConfigError(f"--batch_size: {batch_size} clean images per step do not split evenly over {replicas} "
                          f"replicas ({task.num_workers} workers in TF_CONFIG x "
                          f"{replicas // task.num_workers} device(s) each)")


def share_chief_state(strategy: tf.distribute.Strategy, task: distribute.ClusterTask,
                      variables: Sequence[tf.Variable], epoch: tf.Variable, epochs: int) -> None:
    """Gives every worker the chief's values of `variables` and `epoch`.

    Only the chief's directory holds the run (the others may not see it at
    all), so the chief restores the last checkpoint and every worker then
    takes the chief's weights, optimizer state and epoch: a cluster restarted
    after losing a worker continues from the last epoch the chief saved.

    Args:
      strategy: the MultiWorkerMirroredStrategy (the chief holds replica 0).
      task: this worker.
      variables: the restored state besides `epoch`.
      epoch: the count of finished epochs.
      epochs: the run's epochs (for the message).
    """
    distribute.broadcast_from_first_replica(strategy, [*variables, epoch])
    if not task.is_chief and int(epoch.numpy()):
        print(f"Resuming from the chief's checkpoint (epoch {int(epoch.numpy())} of {epochs})")


def fit_cluster(model: keras.Model, strategy: tf.distribute.Strategy, train_source: data_lib.Source,
                eval_source: Optional[data_lib.Source], *, batch_size: int, seed: int, epochs: int,
                initial_epoch: int, steps_per_epoch: int, callbacks: List[keras.callbacks.Callback],
                verbose: int) -> keras.callbacks.History:
    """Trains on `train_source` (evaluating on `eval_source`) with `fit_distributed`.

    Each epoch is drawn from (seed, epoch) alone (`Source.make_input`'s
    `epochs`), the same on every worker whatever their iterators' history:
    the cluster trains on the batches one device trains on, resumed or not.

    Args:
      model: a compiled model built under `strategy`'s scope.
      strategy: the MultiWorkerMirroredStrategy.
      train_source, eval_source: the training split and the evaluation split (or None).
      batch_size: the global batch, in clean images.
      seed: the run's seed.
      epochs, initial_epoch, steps_per_epoch, callbacks, verbose: as for `fit_distributed`.

    Returns:
      The `History` of the run.
    """
    def train_data(epoch):
        return _worker_slices(train_source, batch_size, seed=seed, epoch=epoch, strategy=strategy)

    eval_data, eval_steps = None, 0
    if eval_source is not None:
        eval_data = _worker_slices(eval_source, batch_size, seed=None, epoch=None, strategy=strategy)
        eval_steps = eval_source.num_examples // batch_size
    return fit_distributed(model, strategy, train_data, epochs=epochs, initial_epoch=initial_epoch,
                           steps_per_epoch=steps_per_epoch, validation_data=eval_data,
                           validation_steps=eval_steps, callbacks=callbacks, verbose=verbose)


def _worker_slices(source: data_lib.Source, batch_size: int, *, seed: Optional[int], epoch: Optional[int],
                   strategy: tf.distribute.Strategy):
    """A multi-worker input: each worker reads its slice of every global batch, in order.

    The training batches of `epoch`, or, when `epoch` is None, one pass of
    the evaluation batches.

    Every worker builds the same global pipeline (same shuffle, same
    augmentation seeds) and keeps the rows of its own replicas, so a global
    batch is split over the cluster exactly as one process splits it over
    its replicas, and an example's noise (seeded by its global position) does
    not depend on how the replicas are spread over machines. Streamed
    datasets (ImageNet) would be read in full by every worker this way: they
    are sharded by file per worker instead (`Source.make_input`), so their
    global batches differ from a single process's, while positions and noise
    stay distinct per replica.
    """
    training = epoch is not None
    epochs = range(epoch, epoch + 1) if training else None
    if source.images is None:
        return source.make_input(batch_size, training=training, seed=seed, drop_remainder=True,
                                 strategy=strategy, epochs=epochs).dataset

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        per_replica = context.get_per_replica_batch_size(batch_size)
        local = per_replica * (context.num_replicas_in_sync // context.num_input_pipelines)
        start = context.input_pipeline_id * local
        if training:
            ds = data_lib.make_epoch_dataset(source.images, source.labels, batch_size, epochs, shuffle=True,
                                             seed=seed, drop_remainder=True, augment=source.name)
        else:
            ds = data_lib.make_dataset(source.images, source.labels, batch_size, shuffle=False, seed=seed,
                                       drop_remainder=True)
        ds = ds.map(lambda x, y: (x[start:start + local], y[start:start + local]))
        return ds.rebatch(per_replica) if local != per_replica else ds

    return strategy.distribute_datasets_from_function(dataset_fn)


def fit_distributed(model: keras.Model, strategy: tf.distribute.Strategy,
                    train_data: Callable[[int], tf.distribute.DistributedDataset], *, epochs: int,
                    initial_epoch: int, steps_per_epoch: int, validation_data=None, validation_steps: int = 0,
                    callbacks: Optional[List[keras.callbacks.Callback]] = None,
                    verbose: int = 2) -> keras.callbacks.History:
    """`model.fit` for a distributed dataset, as a loop over the model's own `train_step`.

    Keras 3's `fit` fails under `MultiWorkerMirroredStrategy` ("Attempt to
    convert a value (PerReplica:{...}) ... to a Tensor": keras-team/keras#20585,
    tensorflow/tensorflow#72388, open with TF 2.21 / Keras 3.15). This loop
    does what `fit` does around the step, in the same order, so the same
    callbacks (checkpoints, TensorBoard, progress bar, epoch schedule)
    behave the same: metrics reset per epoch; per-step logs are the mean over
    replicas of each replica's metrics (Keras's "auto" reduction); epoch logs
    are the last step's; validation resets the metrics, runs `test_step` and
    reports the metrics' global values with a `val_` prefix. Every worker
    runs it in lockstep, so no callback may stop training on one worker only.

    Args:
      model: a compiled Keras model built under `strategy`'s scope.
      strategy: the strategy.
      train_data: epoch -> a distributed dataset of that epoch's
        `steps_per_epoch` batches (or more).
      epochs, initial_epoch, steps_per_epoch: as for `fit`.
      validation_data: a distributed dataset of `validation_steps` batches
        (or more), read from its start at every evaluation; or None.
      validation_steps: batches of `validation_data` per evaluation.
      callbacks: Keras callbacks.
      verbose: 0 silent, 1 progress bar, 2 one line per epoch.

    Returns:
      The `History` of the run.
    """
    per_call = max(1, int(model.steps_per_execution))
    train_step, test_step = model.train_step, model.test_step
    if model.jit_compile:
        train_step = tf.function(train_step, jit_compile=True, reduce_retracing=True)
        test_step = tf.function(test_step, jit_compile=True, reduce_retracing=True)

    def run_steps(step_fn):
        @tf.function
        def steps(iterator, count):  # count: a Python int (one trace for each of at most two values)
            for _ in range(count):
                outputs = strategy.run(step_fn, args=(next(iterator),))
            return {name: strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None)
                    for name, value in outputs.items()}
        return steps

    train_steps, test_steps = run_steps(train_step), run_steps(test_step)
    callbacks = keras.callbacks.CallbackList(callbacks, add_history=True, add_progbar=verbose != 0, model=model,
                                             verbose=verbose, epochs=epochs, steps=steps_per_epoch)
    model.stop_training = False
    callbacks.on_train_begin()
    epoch_logs = None
    for epoch in range(initial_epoch, epochs):
        model.reset_metrics()
        callbacks.on_epoch_begin(epoch)
        train_iterator = iter(train_data(epoch))
        logs = {}
        for begin in range(0, steps_per_epoch, per_call):
            count = min(per_call, steps_per_epoch - begin)
            callbacks.on_train_batch_begin(begin)
            logs = train_steps(train_iterator, count)
            callbacks.on_train_batch_end(begin + count - 1, logs)
            if model.stop_training:
                break
        epoch_logs = dict(logs)
        if validation_data is not None:
            eval_iterator = iter(validation_data)
            model.reset_metrics()
            callbacks.on_test_begin()
            for begin in range(0, validation_steps, per_call):
                count = min(per_call, validation_steps - begin)
                callbacks.on_test_batch_begin(begin)
                callbacks.on_test_batch_end(begin + count - 1, test_steps(eval_iterator, count))
            # Read in cross-replica context: the metrics summed over every replica.
            val_logs = {name: float(value) for name, value in model.get_metrics_result().items()}
            callbacks.on_test_end(val_logs)
            epoch_logs.update({f"val_{name}": value for name, value in val_logs.items()})
        callbacks.on_epoch_end(epoch, epoch_logs)
        if model.stop_training:
            break
    model.optimizer.finalize_variable_values(model.trainable_weights)
    callbacks.on_train_end(logs=epoch_logs)
    return model.history


def weights_fingerprint(model: keras.Model) -> str:
    """SHA-256 of a model's weights (their float bytes, in `model.weights` order).

    Workers of a synchronous run end with identical weights, so they print
    the same fingerprint; it also matches the saved `base_model.keras`.
    """
    digest = hashlib.sha256()
    for value in model.get_weights():
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def print_final_weights(task: distribute.ClusterTask, model: keras.Model) -> None:
    """Prints this worker's `weights_fingerprint`: equal on every worker of a synchronous run."""
    print(f"Worker {task.worker_index} of {task.num_workers}: final weights sha256 {weights_fingerprint(model)}",
          flush=True)
