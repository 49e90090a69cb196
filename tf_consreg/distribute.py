"""The one place that chooses a distribution strategy, and replica-aware helpers.

One rule holds for every loss term the project adds by hand: a replica's
loss is its local mean divided by the number of replicas, the rule Keras's
own loss reductions follow, so that the SUM all-reduce of gradients gives the
gradient of the global mean (`scale_loss`).

Replica ids (`replica_id`) key the training noise (`tf_consreg.noise`). They
are global across the workers of a `MultiWorkerMirroredStrategy` (worker w's
local replica r is w * local + r), and the training input gives each worker
its slice of every global batch, in order, so example positions, and with
them the noise and the loss scaling, are global too.

A multi-worker cluster is described by the standard `TF_CONFIG` environment
variable; `cluster_task` checks it and says which worker this process is.
"""

import dataclasses
import json
import os
from typing import Mapping, Optional, Sequence

import tensorflow as tf

from tf_consreg.errors import ConfigError


TF_CONFIG = "TF_CONFIG"
# The --strategy names `get_strategy` accepts.
STRATEGIES = ("auto", "default", "mirrored", "multi_worker")
# The strategies that split work over the devices of one process, which is
# what certification can use (each image's samples over the replicas).
LOCAL_STRATEGIES = ("default", "mirrored")
_CLUSTER_JOBS = ("chief", "worker")


@dataclasses.dataclass(frozen=True)
class ClusterTask:
    """This process's place in a multi-worker cluster (from `TF_CONFIG`).

    Attributes:
      num_workers: training processes in the cluster (chief included).
      task_type: "chief" or "worker".
      task_index: the task's index within its job.
      worker_index: position among all workers, the chief first: the
        strategy's input pipeline id, and the first of this worker's global
        replica ids divided by its local replica count.
      is_chief: the task that writes the run's files (the "chief" task, or
        worker 0 when the cluster has no "chief" job).
    """

    num_workers: int
    task_type: str
    task_index: int
    worker_index: int
    is_chief: bool


def cluster_task(tf_config: Optional[str]) -> ClusterTask:
    """Checks a `TF_CONFIG` value for `--strategy=multi_worker` and locates this task.

    The format is TensorFlow's: {"cluster": {"worker": ["host:port", ...]},
    "task": {"type": "worker", "index": i}}, optionally with a one-task
    "chief" job. Every process of the cluster gets the same "cluster" and its
    own "task".

    Args:
      tf_config: the variable's value (None or empty: not set).

    Returns:
      The task's `ClusterTask`.

    Raises:
      ConfigError: unset, not JSON, or not a valid worker cluster and task.
    """
    example = '{"cluster": {"worker": ["host0:2222", "host1:2222"]}, "task": {"type": "worker", "index": 0}}'
    if not tf_config or not tf_config.strip():
        raise ConfigError(f"--strategy=multi_worker needs the {TF_CONFIG} environment variable, e.g. "
                          f"{TF_CONFIG}='{example}' (the same cluster on every worker, each its own index)")
    try:
        spec = json.loads(tf_config)
    except ValueError as e:
        raise ConfigError(f"{TF_CONFIG} is not valid JSON ({e}); expected e.g. {example}") from e
    if not isinstance(spec, dict):
        raise ConfigError(f"{TF_CONFIG} must be a JSON object with \"cluster\" and \"task\", e.g. {example}")
    cluster, task = spec.get("cluster"), spec.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise ConfigError(f"{TF_CONFIG} has no \"cluster\" object mapping jobs to \"host:port\" lists, e.g. {example}")
    if not isinstance(task, dict):
        raise ConfigError(f"{TF_CONFIG} has no \"task\" object ({{\"type\": \"worker\", \"index\": i}}), "
                          f"e.g. {example}")
    other = sorted(set(cluster) - set(_CLUSTER_JOBS))
    if other:
        raise ConfigError(f"{TF_CONFIG}: job(s) {', '.join(other)} in \"cluster\" are not used by "
                          "--strategy=multi_worker; list only \"worker\" (and at most one \"chief\")")
    addresses = []
    for job in _CLUSTER_JOBS:
        tasks = cluster.get(job, [])
        if not isinstance(tasks, list) or not all(_is_address(a) for a in tasks):
            raise ConfigError(f"{TF_CONFIG}: cluster.{job} must be a list of \"host:port\" strings, got {tasks!r}")
        addresses.extend(tasks)
    if len(cluster.get("chief", [])) > 1:
        raise ConfigError(f"{TF_CONFIG}: cluster.chief has {len(cluster['chief'])} tasks; it may have one")
    if not addresses:
        raise ConfigError(f"{TF_CONFIG}: the cluster has no tasks; list them under \"worker\", e.g. {example}")
    duplicates = sorted({a for a in addresses if addresses.count(a) > 1})
    if duplicates:
        raise ConfigError(f"{TF_CONFIG}: address(es) {', '.join(duplicates)} listed twice; give each task its own")
    task_type, index = task.get("type"), task.get("index", 0)
    if task_type not in cluster:
        raise ConfigError(f"{TF_CONFIG}: task type {task_type!r} is not a job of the cluster "
                          f"({', '.join(sorted(cluster))})")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(cluster[task_type]):
        raise ConfigError(f"{TF_CONFIG}: task index {index!r} is outside the cluster: job {task_type!r} has "
                          f"{len(cluster[task_type])} task(s), indices 0 to {len(cluster[task_type]) - 1}")
    has_chief = bool(cluster.get("chief"))
    worker_index = 0 if task_type == "chief" else index + int(has_chief)
    return ClusterTask(num_workers=len(addresses), task_type=task_type, task_index=index,
                       worker_index=worker_index, is_chief=worker_index == 0)


def _is_address(value) -> bool:
    if not isinstance(value, str):
        return False
    host, _, port = value.rpartition(":")
    return bool(host) and port.isdigit()


def cluster_task_from_env(environ: Optional[Mapping[str, str]] = None) -> ClusterTask:
    """`cluster_task` of the `TF_CONFIG` environment variable (of `environ`, default the process's)."""
    return cluster_task((os.environ if environ is None else environ).get(TF_CONFIG))


def multi_worker_local_replicas() -> int:
    """Replicas MultiWorkerMirroredStrategy puts on this machine: one per GPU, or one on the CPU.

    Counted without initializing TensorFlow, which must not run any op
    before that strategy exists.
    """
    return max(1, len(tf.config.list_physical_devices("GPU")))


def get_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """Turns a `--strategy` value into a `tf.distribute.Strategy`.

    Args:
      name: "auto" (MirroredStrategy over all GPUs when more than one is
        visible, otherwise the default strategy), "default" (one device),
        "mirrored" (MirroredStrategy over all visible GPUs, or over all logical
        CPU devices when there is no GPU), or "multi_worker"
        (MultiWorkerMirroredStrategy over the `TF_CONFIG` cluster, every
        GPU of each worker or its CPU; it waits until every worker is up, and
        must be created before TensorFlow runs any op in the process).

    Returns:
      The strategy; build models, optimizers and metrics inside its scope.

    Raises:
      ConfigError: unknown name, or a missing or invalid `TF_CONFIG` for
        "multi_worker".
    """
    if name == "multi_worker":
        cluster_task_from_env()  # A clear error rather than TensorFlow's.
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        # On CPU only machines the all-reduce must not use NCCL.
        cross_device_ops = None if gpus else tf.distribute.ReductionToOneDevice()
        return tf.distribute.MirroredStrategy(devices, cross_device_ops=cross_device_ops)
    raise ConfigError(f"--strategy={name!r} is unknown; choose one of {', '.join(STRATEGIES)}")


def broadcast_from_first_replica(strategy: tf.distribute.Strategy, variables: Sequence[tf.Variable]) -> None:
    """Gives every replica (on every worker) replica 0's values of `variables`.

    Under MultiWorkerMirroredStrategy only the chief (replica 0) reads the
    run's checkpoint, which other workers may not even see; this makes the
    cluster continue from the chief's state. An all-reduce of (value on
    replica 0, zeros elsewhere) is a broadcast, exact for any dtype it sums.

    Args:
      strategy: the strategy the variables were created under.
      variables: mirrored variables (Keras or TensorFlow), of dtypes the
        collective all-reduce supports (floats, int32, int64).
    """
    variables = list(variables)
    # One all-reduce per dtype: the collective packs a list into one tensor.
    groups = {}
    for i, variable in enumerate(variables):
        groups.setdefault(variable.dtype, []).append(i)

    def replica_fn():
        context = tf.distribute.get_replica_context()
        first = tf.equal(context.replica_id_in_sync_group, 0)
        reduced = {}
        for indices in groups.values():
            values = [tf.convert_to_tensor(variables[i]) for i in indices]
            sums = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                      [tf.where(first, v, tf.zeros_like(v)) for v in values])
            reduced.update(zip(indices, sums))
        return [reduced[i] for i in range(len(variables))]

    results = strategy.run(tf.function(replica_fn))
    for variable, result in zip(variables, results):
        variable.assign(strategy.experimental_local_results(result)[0])


def num_replicas() -> int:
    """Replicas in sync under the current strategy (1 outside any strategy)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def scale_loss(value: tf.Tensor) -> tf.Tensor:
    """Local mean -> this replica's share of the global mean (divides by replicas)."""
    n = num_replicas()
    return value if n == 1 else value * tf.cast(1.0 / n, value.dtype)


def unscale_loss(value: tf.Tensor) -> tf.Tensor:
    """Inverse of `scale_loss`, for reporting a replica's loss as its local mean."""
    n = num_replicas()
    return value if n == 1 else value * tf.cast(n, value.dtype)


def replica_id() -> tf.Tensor:
    """This replica's index in its sync group (0 outside a replica context)."""
    context = tf.distribute.get_replica_context()
    if context is None:
        return tf.constant(0, tf.int32)
    return tf.cast(context.replica_id_in_sync_group, tf.int32)
