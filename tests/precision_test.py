"""The bfloat16 capability probe and the policy resolver.

The machines that run these tests vary (with or without avx512_bf16, AMX or
GPUs), so every decision is checked on capabilities written out here, from
/proc/cpuinfo texts in the kernel's format or from GPU compute capabilities,
and the probe of this machine only against its own /proc/cpuinfo.
"""

import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

from tf_consreg import precision
from tf_consreg.errors import ConfigError

# Excerpts of real /proc/cpuinfo files (other keys and flags left out).
SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""
COOPER_LAKE = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8380H CPU @ 2.90GHz
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16
"""
SKYLAKE = """processor\t: 0
model name\t: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz
flags\t\t: fpu sse2 avx2 avx512f avx512bw
"""
GRAVITON = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics bf16
CPU implementer\t: 0x41
"""

AMX_CPU = precision.Capability(cpu_model="Intel(R) Xeon(R) Platinum 8480+", cpu_flags=("avx512_bf16", "amx_bf16"))
AVX2_CPU = precision.Capability(cpu_model="Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz", cpu_flags=())
UNKNOWN_CPU = precision.Capability(cpu_model=None, cpu_flags=None)
A100 = precision.Gpu("NVIDIA A100-SXM4-40GB", (8, 0))
V100 = precision.Gpu("Tesla V100-SXM2-16GB", (7, 0))
H100 = precision.Gpu("NVIDIA H100 80GB HBM3", (9, 0))


def _write(directory, text):
    path = os.path.join(directory, "cpuinfo")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


class CpuinfoTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("amx", SAPPHIRE_RAPIDS, "Intel(R) Xeon(R) Platinum 8480+", ("avx512_bf16", "amx_bf16")),
        ("avx512_bf16_only", COOPER_LAKE, "Intel(R) Xeon(R) Platinum 8380H CPU @ 2.90GHz", ("avx512_bf16",)),
        ("none", SKYLAKE, "Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz", ()),
        # aarch64 lists "Features", not "flags", and no model name: not counted (see the module docstring).
        ("arm", GRAVITON, None, ()),
        ("empty", "", None, ()),
    )
    def test_parse(self, text, model, flags):
        self.assertEqual(precision.parse_cpuinfo(text), (model, flags))

    def test_a_flag_counts_only_when_every_processor_has_it(self):
        second = SAPPHIRE_RAPIDS.replace("processor\t: 0", "processor\t: 1").replace(" amx_bf16", "")
        self.assertEqual(precision.parse_cpuinfo(SAPPHIRE_RAPIDS + "\n" + second)[1], ("avx512_bf16",))

    def test_cpu_capability_reads_the_file(self):
        with tempfile.TemporaryDirectory() as directory:
            self.assertEqual(precision.cpu_capability(_write(directory, COOPER_LAKE)),
                             ("Intel(R) Xeon(R) Platinum 8380H CPU @ 2.90GHz", ("avx512_bf16",)))

    def test_unreadable_cpuinfo_is_unknown_not_an_error(self):
        with tempfile.TemporaryDirectory() as directory:
            missing = os.path.join(directory, "no_proc", "cpuinfo")
            self.assertEqual(precision.cpu_capability(missing), (None, None))
            self.assertEqual(precision.cpu_capability(directory), (None, None))  # A directory: open fails too.
            capability = precision.probe(cpuinfo=missing, gpus=[])
        self.assertFalse(capability.native_bfloat16)
        self.assertIn("bfloat16 support unknown", capability.describe())

    def test_probe_of_this_machine_matches_its_cpuinfo(self):
        expected = precision.cpu_capability(precision.CPUINFO)
        capability = precision.probe()
        self.assertEqual((capability.cpu_model, capability.cpu_flags), expected)

    def test_probe_takes_the_gpus_given(self):
        with tempfile.TemporaryDirectory() as directory:
            capability = precision.probe(cpuinfo=_write(directory, SKYLAKE), gpus=[A100])
        self.assertEqual(capability.gpus, (A100,))
        self.assertTrue(capability.native_bfloat16)


class CapabilityTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("amx_cpu", AMX_CPU, True),
        ("avx512_bf16_cpu", precision.Capability("Cooper Lake", ("avx512_bf16",)), True),
        ("amx_only_cpu", precision.Capability("?", ("amx_bf16",)), True),
        ("avx2_cpu", AVX2_CPU, False),
        ("unknown_cpu", UNKNOWN_CPU, False),
        ("ampere", precision.Capability(None, None, (A100,)), True),
        ("hopper_pair", precision.Capability(None, None, (H100, H100)), True),
        # The GPUs compute when there are any: an old GPU decides against an AMX CPU.
        ("volta_beside_amx", precision.Capability("Xeon", ("avx512_bf16", "amx_bf16"), (V100,)), False),
        ("mixed_gpus", precision.Capability(None, None, (A100, V100)), False),
        ("gpu_capability_unknown", precision.Capability(None, None, (precision.Gpu("?", None),)), False),
    )
    def test_native_bfloat16(self, capability, expected):
        self.assertEqual(capability.native_bfloat16, expected)

    def test_describe_names_the_hardware(self):
        self.assertEqual(AMX_CPU.describe(),
                         "CPU Intel(R) Xeon(R) Platinum 8480+: native bfloat16 (avx512_bf16, amx_bf16)")
        self.assertEqual(AVX2_CPU.describe(), "CPU Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz: no native bfloat16 "
                                              "(none of avx512_bf16, amx_bf16)")
        self.assertEqual(precision.Capability(None, None, (A100, V100)).describe(),
                         "GPU 0 NVIDIA A100-SXM4-40GB (compute capability 8.0): native bfloat16; "
                         "GPU 1 Tesla V100-SXM2-16GB (compute capability 7.0): no native bfloat16 (needs 8.0)")


class ResolveTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("amx_cpu", AMX_CPU, "mixed_bfloat16"),
        ("avx2_cpu", AVX2_CPU, "float32"),
        ("unknown_cpu", UNKNOWN_CPU, "float32"),
        ("ampere", precision.Capability(None, None, (A100,)), "mixed_bfloat16"),
        ("volta", precision.Capability("Xeon", ("amx_bf16",), (V100,)), "float32"),
    )
    def test_auto(self, capability, policy):
        resolution = precision.resolve("auto", capability)
        self.assertEqual(resolution.policy, policy)
        self.assertEqual(resolution.mixed, policy != "float32")
        self.assertEqual(resolution.reason, f"--mixed_precision=auto chose {policy}: {capability.describe()}")

    @parameterized.parameters("none", "float32")
    def test_float32_needs_no_probe(self, requested):
        # Given a bfloat16 machine, float32 is still float32.
        resolution = precision.resolve(requested, AMX_CPU)
        self.assertEqual((resolution.requested, resolution.policy), (requested, "float32"))
        self.assertFalse(resolution.mixed)
        self.assertEqual(resolution.reason, f"--mixed_precision={requested}: float32 throughout")

    @parameterized.named_parameters(
        ("bf16_native", "mixed_bfloat16", AMX_CPU, False),
        ("bf16_emulated", "mixed_bfloat16", AVX2_CPU, True),
        ("fp16_gpu", "mixed_float16", precision.Capability(None, None, (V100,)), False),
        ("fp16_cpu", "mixed_float16", AMX_CPU, True),
    )
    def test_an_explicit_policy_is_kept_and_a_slow_one_says_so(self, requested, capability, slow):
        resolution = precision.resolve(requested, capability)
        self.assertEqual(resolution.policy, requested)
        self.assertTrue(resolution.mixed)
        self.assertEqual("expect it slower than float32" in resolution.reason, slow)
        self.assertTrue(resolution.reason.endswith(capability.describe()))

    def test_every_reason_is_one_line(self):
        for requested in precision.POLICIES:
            for capability in (AMX_CPU, AVX2_CPU, UNKNOWN_CPU, precision.Capability(None, None, (A100, V100))):
                self.assertNotIn("\n", precision.resolve(requested, capability).reason)

    def test_auto_probes_this_machine_by_default(self):
        self.assertEqual(precision.resolve("auto"), precision.resolve("auto", precision.probe()))

    def test_unknown_policy(self):
        with self.assertRaisesRegex(ConfigError, r"^--mixed_precision='bfloat16' is unknown; choose one of auto, "
                                                 r"none, float32, mixed_bfloat16, mixed_float16$"):
            precision.resolve("bfloat16", AMX_CPU)
        with self.assertRaisesRegex(ConfigError, r"^--mixed_precision='bfloat16' is unknown"):
            precision.fixed_policy("bfloat16")

    @parameterized.parameters(("auto", None), ("none", "float32"), ("float32", "float32"),
                              ("mixed_bfloat16", "mixed_bfloat16"), ("mixed_float16", "mixed_float16"))
    def test_fixed_policy_is_what_resolve_gives_on_any_machine(self, requested, policy):
        self.assertEqual(precision.fixed_policy(requested), policy)
        chosen = {precision.resolve(requested, capability).policy for capability in (AMX_CPU, AVX2_CPU, UNKNOWN_CPU)}
        self.assertEqual(chosen, {"mixed_bfloat16", "float32"} if policy is None else {policy})
        self.assertTrue(chosen <= set(precision.KERAS_POLICIES))


class ComputePolicyTest(absltest.TestCase):

    def test_policies(self):
        self.assertEqual(precision.compute_policy("float32"), "float32")
        self.assertEqual(precision.compute_policy("bfloat16"), "mixed_bfloat16")

    def test_unknown_dtype(self):
        with self.assertRaisesRegex(ConfigError, r"^--compute_dtype='float16' is unknown; choose one of float32, "
                                                 r"bfloat16$"):
            precision.compute_policy("float16")


if __name__ == "__main__":
    absltest.main()
