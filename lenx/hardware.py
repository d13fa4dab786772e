"""What the CPU is and can do: its name and vector features as the operating system reports them, and whether it
has bf16 matrix units, which decides what `precision: auto` trains in on a CPU.

torch's own capability string cannot answer the bf16 question: `torch.backends.cpu.get_cpu_capability()` names
the kernel set torch dispatches to (`AVX2`, `AVX512`), and says `AVX512` on a CPU with AMX and AVX512-BF16 as on
one without. The features are read from /proc/cpuinfo (Linux, x86 and ARM) or sysctl (macOS); where they cannot
be read the answer is "unknown", and `train` measures instead (lenx.precision).
"""

from __future__ import annotations

import platform
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# x86 flags (Linux names) that bf16 autocast runs natively on: AVX512-BF16 dot products, AMX tiles
X86_BF16 = ("avx512_bf16", "amx_bf16")
# The vector features worth stating beside a speed figure (others, e.g. sse2, say nothing about it)
VECTOR_FEATURES = (
    "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2", "bf16", "i8mm", "sme",
)


@dataclass(frozen=True)
class CPU:
    name: str
    arch: str  # x86_64, aarch64, arm64, ...
    features: tuple[str, ...]  # the VECTOR_FEATURES it has, in that order
    known: bool  # whether the features could be read at all

    @property
    def bf16_units(self) -> bool | None:
        """True: bf16 matrix instructions (x86 AVX512-BF16 or AMX-BF16; ARM FEAT_BF16). False: none, so bf16
        autocast is emulated and slower than fp32. None: the features could not be read."""
        if not self.known:
            return None
        x86 = self.arch.lower() in ("x86_64", "amd64", "i386", "i686", "x86")
        return any(f in self.features for f in X86_BF16) if x86 else "bf16" in self.features

    def describe(self) -> str:
        """One line for a benchmark's title: the name and the features that matter for speed."""
        shown = [f for f in self.features if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "sve",
                                                   "bf16")]
        return f"{self.name} ({self.arch}; {', '.join(shown) if shown else 'features unknown' if not self.known else 'no AVX2/AVX-512/NEON'})"

    def to_dict(self) -> dict:
        return {"name": self.name, "arch": self.arch, "features": list(self.features), "bf16_units": self.bf16_units}


def parse_cpuinfo(text: str, arch: str) -> CPU:
    """A CPU from the text of /proc/cpuinfo: x86 lists `flags`, ARM `Features` (per core; the first is read)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    flags = (fields.get("flags") or fields.get("Features") or "").split()
    known = bool(flags)
    name = fields.get("model name") or fields.get("Model") or fields.get("Hardware") or fields.get("Processor") or ""
    if not name and "CPU implementer" in fields:
        name = f"ARM implementer {fields['CPU implementer']} part {fields.get('CPU part', '?')}"
    return CPU(name or platform.processor() or arch, arch, _vector(flags), known)


def parse_sysctl(text: str, arch: str) -> CPU:
    """A CPU from `sysctl machdep.cpu.brand_string hw.optional` output (macOS): `hw.optional.arm.FEAT_BF16: 1`
    and the like for Apple silicon, `hw.optional.avx2_0: 1` for Intel Macs."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip()
    flags = []
    for key, value in values.items():
        if not key.startswith("hw.optional.") or value != "1":
            continue
        flag = key.removeprefix("hw.optional.").removeprefix("arm.").lower()
        flag = {"feat_bf16": "bf16", "feat_i8mm": "i8mm", "neon": "asimd", "avx2_0": "avx2", "avx512f": "avx512f",
                "avx1_0": "avx", "fma": "fma"}.get(flag, flag)
        flags.append(flag)
    return CPU(values.get("machdep.cpu.brand_string") or arch, arch, _vector(flags), bool(flags))


def _vector(flags) -> tuple[str, ...]:
    have = set(flags)
    return tuple(f for f in VECTOR_FEATURES if f in have)


@lru_cache(maxsize=1)
def this_cpu() -> CPU:
    """This machine's CPU (read once per process)."""
    arch = platform.machine() or "unknown"
    if platform.system() == "Linux":
        try:
            return parse_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"), arch)
        except OSError:
            pass
    elif platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "machdep.cpu.brand_string", "hw.optional"], capture_output=True,
                                 text=True, timeout=5).stdout
            return parse_sysctl(out, arch)
        except (OSError, subprocess.SubprocessError):
            pass
    return CPU(platform.processor() or arch, arch, (), False)
