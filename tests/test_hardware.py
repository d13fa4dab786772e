"""CPU features, the precision `auto` picks from them, and an MFU that says when its peak was measured low."""

import json

import pytest
import torch

from lenx import precision as prec
from lenx.errors import LenxError
from lenx.hardware import CPU, parse_cpuinfo, parse_sysctl, this_cpu
from lenx.perf import measure_matmul_peak, utilisation

# Recorded /proc/cpuinfo excerpts (first core). Sapphire Rapids: AVX512-BF16 and AMX, yet torch reports "AVX512".
XEON_SPR = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512ifma avx512cd avx512bw \
avx512vl avx_vnni avx512_bf16 avx512vbmi avx512_vbmi2 avx512_vnni avx512_bitalg amx_bf16 avx512_fp16 amx_tile amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse sse2
"""
EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme de pse sse sse2 ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c avx2 bmi2
"""
ICELAKE_AVX512 = """model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni
"""
GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop \
sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""
GRAVITON2 = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer\t: 0x41
CPU part\t: 0xd0c
"""
APPLE_M2 = """machdep.cpu.brand_string: Apple M2
hw.optional.arm.FEAT_BF16: 1
hw.optional.arm.FEAT_I8MM: 1
hw.optional.neon: 1
hw.optional.floatingpoint: 1
"""
APPLE_M1 = """machdep.cpu.brand_string: Apple M1
hw.optional.arm.FEAT_BF16: 0
hw.optional.neon: 1
"""


@pytest.mark.parametrize("text, arch, name, units", [
    (XEON_SPR, "x86_64", "Intel(R) Xeon(R) Processor", True),
    (EPYC_AVX2, "x86_64", "AMD EPYC 7B13", False),
    (ICELAKE_AVX512, "x86_64", "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", False),
    (GRAVITON3, "aarch64", "ARM implementer 0x41 part 0xd40", True),
    (GRAVITON2, "aarch64", "ARM implementer 0x41 part 0xd0c", False),
])
def test_bf16_units_are_read_from_the_cpu_features(text, arch, name, units):
    cpu = parse_cpuinfo(text, arch)
    assert cpu.known and cpu.name == name and cpu.bf16_units is units
    assert cpu.to_dict()["bf16_units"] is units


def test_the_first_core_is_read_and_only_vector_features_are_kept():
    cpu = parse_cpuinfo(XEON_SPR, "x86_64")
    assert cpu.features == ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                            "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
    assert "amx_bf16" in cpu.describe() and cpu.describe().startswith("Intel(R) Xeon(R) Processor (x86_64; ")


@pytest.mark.parametrize("text, units", [(APPLE_M2, True), (APPLE_M1, False)])
def test_macos_features_come_from_sysctl(text, units):
    cpu = parse_sysctl(text, "arm64")
    assert cpu.known and cpu.name.startswith("Apple M") and cpu.bf16_units is units and "asimd" in cpu.features


def test_unreadable_features_are_unknown():
    assert parse_cpuinfo("processor\t: 0\n", "riscv64").bf16_units is None
    assert parse_sysctl("", "arm64").bf16_units is None


def test_this_machine_is_described():
    cpu = this_cpu()
    assert cpu.name and cpu.arch and cpu.bf16_units in (True, False, None)


SPR, EPYC = parse_cpuinfo(XEON_SPR, "x86_64"), parse_cpuinfo(EPYC_AVX2, "x86_64")
UNKNOWN = CPU("Mystery", "riscv64", (), False)


def test_auto_follows_the_features_on_a_cpu():
    never = lambda: pytest.fail("features are known: nothing is measured")  # noqa: E731
    bf16 = prec.choose("auto", "cpu", measure=never, cpu=SPR)
    assert bf16.precision == "bf16" and "avx512_bf16" in bf16.reason and "amx_bf16" in bf16.reason
    fp32 = prec.choose("auto", "cpu", measure=never, cpu=EPYC)
    assert fp32.precision == "fp32" and "no bf16" in fp32.reason


def test_asked_for_precisions_are_kept_and_unknown_ones_refused():
    assert prec.choose("fp32", "cpu", cpu=SPR) == prec.Choice("fp32", "asked for")
    assert prec.choose("bf16", "cpu", cpu=EPYC) == prec.Choice("bf16", "asked for")
    with pytest.raises(LenxError, match="unknown precision 'fp16'; known: auto, fp32, bf16"):
        prec.choose("fp16", "cpu")


@pytest.mark.parametrize("faster", ["fp32", "bf16"])
def test_unknown_features_measure_once_per_machine_and_cache_the_answer(faster, tmp_path, monkeypatch):
    monkeypatch.setenv("LENX_CACHE", str(tmp_path))
    calls = []

    def measure():
        calls.append(1)
        return {"fp32": 0.010, "bf16": 0.020} if faster == "fp32" else {"fp32": 0.020, "bf16": 0.010}

    first = prec.choose("auto", "cpu", measure=measure, cpu=UNKNOWN)
    assert first.precision == faster and "measured" in first.reason and "10.0 ms" in first.reason
    again = prec.choose("auto", "cpu", measure=measure, cpu=UNKNOWN)
    assert again.precision == faster and "earlier" in again.reason and len(calls) == 1
    assert json.loads((tmp_path / "precision.json").read_text()) == {prec.machine_key(UNKNOWN): faster}


def test_unknown_features_without_a_measurement_train_in_fp32(tmp_path, monkeypatch):
    monkeypatch.setenv("LENX_CACHE", str(tmp_path))
    assert prec.choose("auto", "cpu", cpu=UNKNOWN).precision == "fp32"


def test_time_steps_times_both_precisions_alternately():
    seen = []
    seconds = prec.time_steps(seen.append, repeats=2)
    assert seen == ["fp32", "bf16"] * 3 and set(seconds) == {"fp32", "bf16"} and min(seconds.values()) >= 0


def test_the_peak_is_measured_at_the_given_thread_count_and_leaves_it_as_it_was():
    before = torch.get_num_threads()
    seen = []
    real = torch.Tensor.__matmul__

    def spy(a, b):
        seen.append(torch.get_num_threads())
        return real(a, b)

    torch.Tensor.__matmul__ = spy
    try:
        peak = measure_matmul_peak(n=64, seconds=0.02, threads=1, repeats=3)
    finally:
        torch.Tensor.__matmul__ = real
    assert peak > 0 and set(seen) == {1} and len(seen) >= 2 * 4  # a warm-up and 3 timings of 2+ multiplies
    assert torch.get_num_threads() == before


def test_a_peak_for_row_shards_runs_one_multiply_per_shard_side_by_side():
    """workers=2, threads=2: two threads of one intra-op thread each, multiplying at once; their rates add."""
    import threading

    before = torch.get_num_threads()
    seen = []
    real = torch.Tensor.__matmul__

    def spy(a, b):
        seen.append((threading.get_ident(), torch.get_num_threads()))
        return real(a, b)

    torch.Tensor.__matmul__ = spy
    try:
        peak = measure_matmul_peak(n=64, seconds=0.02, threads=2, repeats=3, workers=2)
    finally:
        torch.Tensor.__matmul__ = real
    assert peak > 0 and {t for _, t in seen} == {1} and len({i for i, _ in seen}) == 2
    assert threading.get_ident() not in {i for i, _ in seen} and torch.get_num_threads() == before


def test_an_mfu_above_one_comes_with_a_warning():
    assert utilisation(50e9, 100e9) == (0.5, None)
    mfu, warning = utilisation(130e9, 100e9)
    assert mfu == pytest.approx(1.3) and "above 100%" in warning and "100 GFLOP/s" in warning
