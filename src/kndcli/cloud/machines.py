"""Which GPUs a Compute Engine machine type can carry, as Vertex AI custom training takes them.

Checked before any request, so `--accelerator NVIDIA_L4` on the default `n1-highcpu-32`
is a usage error naming the fix instead of a 400 from the API after a dry run said yes.
N1 machines take the older GPUs as attachments (T4, V100, P100, P4) in counts of 1, 2, 4
(V100 also 8); the A2, A3, A4 and G2 types come with their GPUs built in, so the type
fixes both the accelerator and its count. (Google Cloud documentation, "GPU machine
types" and Vertex AI "Configure compute resources for custom training".) Types not
listed here (TPUs, new families) are passed through unchecked.
"""

from __future__ import annotations

import re

from kndcli.errors import ConfigError

# Attachable to N1 machines: the counts allowed.
N1_GPUS = {
    "NVIDIA_TESLA_T4": (1, 2, 4),
    "NVIDIA_TESLA_V100": (1, 2, 4, 8),
    "NVIDIA_TESLA_P100": (1, 2, 4),
    "NVIDIA_TESLA_P4": (1, 2, 4),
}
# Built in: machine-type pattern -> (accelerator, count from the name or a fixed count).
_G2_L4S = {"4": 1, "8": 1, "12": 1, "16": 1, "32": 1, "24": 2, "48": 4, "96": 8}
BUILT_IN: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"a2-highgpu-(1|2|4|8)g"), "NVIDIA_TESLA_A100"),
    (re.compile(r"a2-megagpu-(16)g"), "NVIDIA_TESLA_A100"),
    (re.compile(r"a2-ultragpu-(1|2|4|8)g"), "NVIDIA_A100_80GB"),
    (re.compile(r"a3-highgpu-(1|2|4|8)g"), "NVIDIA_H100_80GB"),
    (re.compile(r"a3-megagpu-(8)g"), "NVIDIA_H100_MEGA_80GB"),
    (re.compile(r"a3-ultragpu-(8)g"), "NVIDIA_H200_141GB"),
    (re.compile(r"a4-highgpu-(8)g"), "NVIDIA_B200"),
    (re.compile(r"g2-standard-(4|8|12|16|24|32|48|96)"), "NVIDIA_L4"),
]


def built_in_gpus(machine: str) -> tuple[str, int] | None:
    """(accelerator, count) a GPU machine type comes with, or None."""
    for pattern, accelerator in BUILT_IN:
        match = pattern.fullmatch(machine)
        if match:
            size = match[1]
            return accelerator, _G2_L4S[size] if machine.startswith("g2-") else int(size)
    return None


def check_machine(machine: str, accelerator: str, count: int) -> None:
    """Refuse a machine type x accelerator x count that Vertex AI would refuse."""
    built_in = built_in_gpus(machine)
    if built_in is not None:
        gpu, n = built_in
        if accelerator != gpu or (count or 1) != n:
            raise ConfigError(
                f"key 'cloud.accelerator': {machine} comes with {n} x {gpu}: pass "
                f"--accelerator {gpu} --accelerator-count {n} (got "
                f"{accelerator or 'none'} x {count or (1 if accelerator else 0)})"
            )
        return
    known = accelerator in N1_GPUS or any(accelerator == g for _, g in BUILT_IN)
    if not accelerator or not known:
        return
    if accelerator not in N1_GPUS:
        types = sorted({p.pattern.split("-(")[0] for p, g in BUILT_IN if g == accelerator})
        raise ConfigError(
            f"key 'cloud.machine': {accelerator} comes built into {', '.join(types)} machine "
            f"types, not attached to {machine}: pass e.g. --machine "
            f"{_example(accelerator)}"
        )
    if not machine.startswith("n1-"):
        raise ConfigError(
            f"key 'cloud.machine': {accelerator} attaches to N1 machine types only, not "
            f"{machine} (e.g. --machine n1-standard-8)"
        )
    if (count or 1) not in N1_GPUS[accelerator]:
        allowed = ", ".join(map(str, N1_GPUS[accelerator]))
        raise ConfigError(
            f"key 'cloud.accelerator_count': {count} x {accelerator}: Vertex AI takes "
            f"{allowed} on an N1 machine"
        )


def _example(accelerator: str) -> str:
    examples = {
        "NVIDIA_L4": "g2-standard-8",
        "NVIDIA_TESLA_A100": "a2-highgpu-1g",
        "NVIDIA_A100_80GB": "a2-ultragpu-1g",
        "NVIDIA_H100_80GB": "a3-highgpu-1g",
    }
    return examples.get(accelerator, "(see the machine types above)")
