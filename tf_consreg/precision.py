"""Compute precision: which device computes bfloat16 natively, and which Keras policy a run uses.

`probe()` reports what the hardware offers: native bfloat16 on a CPU with
AVX512-BF16 (`avx512_bf16`) or AMX (`amx_bf16`) instructions, as Linux lists
them in /proc/cpuinfo, or on a GPU of compute capability 8.0 or more
(Ampere and later). Computation runs on the GPUs when TensorFlow sees any, so
the GPUs decide then, and the CPU otherwise.

`resolve()` turns a requested policy (`auto`, `none` or `float32`,
`mixed_bfloat16`, `mixed_float16`) into the Keras dtype policy a run uses and
a one-line reason to print. `auto` picks `mixed_bfloat16` where bfloat16 is
native and `float32` elsewhere. The capability is an argument, so `auto`'s
choice can be checked for any machine; by default it is probed.

Under every mixed policy the variables, the logits and the losses stay
float32 (see tf_consreg.models); only the layers' arithmetic narrows.
"""

import dataclasses
from typing import Optional, Sequence, Tuple

from tf_consreg.errors import ConfigError

CPUINFO = "/proc/cpuinfo"
# /proc/cpuinfo flags of x86 instructions that compute bfloat16 products natively.
CPU_BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")
# Tensor cores compute bfloat16 from Ampere (compute capability 8.0) on.
GPU_BFLOAT16_CAPABILITY = (8, 0)

# What --mixed_precision accepts; "none" and "float32" are the same policy.
POLICIES = ("auto", "none", "float32", "mixed_bfloat16", "mixed_float16")
# The Keras dtype policies a request resolves to.
KERAS_POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")
# The dtypes a base model can compute in when it is certified, predicted or exported.
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Gpu:
    """A GPU TensorFlow sees: its name and compute capability (major, minor), None if unknown."""

    name: str
    compute_capability: Optional[Tuple[int, int]]

    @property
    def native_bfloat16(self) -> bool:
        return self.compute_capability is not None and tuple(self.compute_capability) >= GPU_BFLOAT16_CAPABILITY


@dataclasses.dataclass(frozen=True)
class Capability:
    """What the machine offers for bfloat16.

    Attributes:
      cpu_model: the CPU's model name, None if unknown.
      cpu_flags: the bfloat16 flags of CPU_BFLOAT16_FLAGS the CPU has; None
        when the CPU's flags could not be read (no /proc/cpuinfo: not Linux,
        or a sandbox without /proc).
      gpus: the GPUs TensorFlow sees; they compute when there are any.
    """

    cpu_model: Optional[str]
    cpu_flags: Optional[Tuple[str, ...]]
    gpus: Tuple[Gpu, ...] = ()

    @property
    def native_bfloat16(self) -> bool:
        """Whether the devices that compute have native bfloat16 (every GPU, or else the CPU)."""
        if self.gpus:
            return all(gpu.native_bfloat16 for gpu in self.gpus)
        return bool(self.cpu_flags)

    def describe(self) -> str:
        """One line, e.g. 'CPU Intel(R) Xeon(R) Processor: native bfloat16 (avx512_bf16, amx_bf16)'."""
        if self.gpus:
            parts = []
            for i, gpu in enumerate(self.gpus):
                capability = ("compute capability unknown" if gpu.compute_capability is None
                              else "compute capability " + ".".join(str(v) for v in gpu.compute_capability))
                parts.append(f"GPU {i} {gpu.name} ({capability}): "
                             + ("native bfloat16" if gpu.native_bfloat16 else "no native bfloat16 (needs 8.0)"))
            return "; ".join(parts)
        cpu = f"CPU {self.cpu_model or '(model unknown)'}"
        if self.cpu_flags is None:
            return f"{cpu}: bfloat16 support unknown ({CPUINFO} unreadable)"
        if self.cpu_flags:
            return f"{cpu}: native bfloat16 ({', '.join(self.cpu_flags)})"
        return f"{cpu}: no native bfloat16 (none of {', '.join(CPU_BFLOAT16_FLAGS)})"


def parse_cpuinfo(text: str) -> Tuple[Optional[str], Tuple[str, ...]]:
    """The model name and the bfloat16 flags (of CPU_BFLOAT16_FLAGS) in /proc/cpuinfo's text.

    A flag counts when every processor listed has it (they all run the
    process's threads).
    """
    model = None
    flag_sets = []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags":
            flag_sets.append(set(value.split()))
    common = set.intersection(*flag_sets) if flag_sets else set()
    return model, tuple(flag for flag in CPU_BFLOAT16_FLAGS if flag in common)


def cpu_capability(cpuinfo: str = CPUINFO) -> Tuple[Optional[str], Optional[Tuple[str, ...]]]:
    """The CPU's model name and bfloat16 flags from a cpuinfo file; (None, None) when it is unreadable."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None, None
    return parse_cpuinfo(text)


def visible_gpus() -> Tuple[Gpu, ...]:
    """The GPUs TensorFlow sees, with their compute capabilities."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel  The CPU probe needs no TensorFlow.

    gpus = []
    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        capability = details.get("compute_capability")
        gpus.append(Gpu(name=details.get("device_name", device.name),
                        compute_capability=tuple(int(v) for v in capability) if capability else None))
    return tuple(gpus)


def probe(cpuinfo: str = CPUINFO, gpus: Optional[Sequence[Gpu]] = None) -> Capability:
    """This machine's bfloat16 capability.

    Args:
      cpuinfo: the file listing the CPU's flags.
      gpus: the GPUs to judge; default: the ones TensorFlow sees.
    """
    model, flags = cpu_capability(cpuinfo)
    return Capability(cpu_model=model, cpu_flags=flags, gpus=tuple(visible_gpus() if gpus is None else gpus))


@dataclasses.dataclass(frozen=True)
class Resolution:
    """A requested policy resolved: the Keras dtype policy and why.

    Attributes:
      requested: what was asked for (one of POLICIES).
      policy: the Keras dtype policy: float32, mixed_bfloat16 or mixed_float16.
      reason: one line for the user, naming the hardware.
    """

    requested: str
    policy: str
    reason: str

    @property
    def mixed(self) -> bool:
        return self.policy != "float32"


def fixed_policy(requested: str) -> Optional[str]:
    """The Keras policy a request names whatever the machine; None for "auto", which the machine decides.

    Raises:
      ConfigError: an unknown policy, naming --mixed_precision.
    """
    if requested not in POLICIES:
        raise ConfigError(f"--mixed_precision={requested!r} is unknown; choose one of {', '.join(POLICIES)}")
    if requested == "auto":
        return None
    return "float32" if requested in ("none", "float32") else requested


def resolve(requested: str, capability: Optional[Capability] = None) -> Resolution:
    """Resolves a requested precision policy for a machine.

    Args:
      requested: one of POLICIES.
      capability: the machine's; default: `probe()`.

    Returns:
      The Keras policy and a one-line reason.

    Raises:
      ConfigError: an unknown policy, naming --mixed_precision.
    """
    if fixed_policy(requested) == "float32":
        return Resolution(requested, "float32", f"--mixed_precision={requested}: float32 throughout")
    if capability is None:
        capability = probe()
    hardware = capability.describe()
    if requested == "auto":
        if capability.native_bfloat16:
            return Resolution(requested, "mixed_bfloat16", f"--mixed_precision=auto chose mixed_bfloat16: {hardware}")
        return Resolution(requested, "float32", f"--mixed_precision=auto chose float32: {hardware}")
    if requested == "mixed_bfloat16":
        note = "" if capability.native_bfloat16 else " (emulated: expect it slower than float32)"
        return Resolution(requested, requested, f"--mixed_precision=mixed_bfloat16{note}: {hardware}")
    # mixed_float16: fast on GPU tensor cores (compute capability 7.0 on), emulated on CPUs.
    note = "" if capability.gpus else " (emulated on a CPU: expect it slower than float32)"
    return Resolution(requested, requested, f"--mixed_precision=mixed_float16 with loss scaling{note}: {hardware}")


def compute_policy(compute_dtype: str) -> str:
    """The Keras policy under which a model's layers compute in `compute_dtype` with float32 variables.

    Raises:
      ConfigError: not one of COMPUTE_DTYPES, naming --compute_dtype.
    """
    if compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"--compute_dtype={compute_dtype!r} is unknown; choose one of {', '.join(COMPUTE_DTYPES)}")
    return "float32" if compute_dtype == "float32" else "mixed_bfloat16"


__all__ = ["COMPUTE_DTYPES", "CPU_BFLOAT16_FLAGS", "Capability", "GPU_BFLOAT16_CAPABILITY", "Gpu", "KERAS_POLICIES",
           "POLICIES", "Resolution", "compute_policy", "cpu_capability", "fixed_policy", "parse_cpuinfo", "probe",
           "resolve", "visible_gpus"]
