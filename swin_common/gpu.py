"""What each GPU generation supports: the precision, kernels in the installed builds, peak FLOP/s.

What each GPU generation supports, in one place below the loader, the engine and tracking, which all ask:
the precision a run gets, whether the installed torch and DALI builds have kernels for the GPU, and the peak
FLOP/s that MFU is measured against.

Every function takes the device's facts (name, compute capability) as arguments, so the rules are tested on CPU
for V100, A100, H100 and H200 alike; `current_gpu()` reads them from the device a rank drives.

- Precision (`train.precision: auto`): bf16 only from compute capability 8.0 (Ampere) on. V100 (sm_70) has no
  bf16 tensor cores; `torch.cuda.is_bf16_supported()` still says True there (its default counts emulation), so
  it is not asked. Below 8.0: fp16 with dynamic loss scaling.
- Kernels: a cubin built for sm_XY runs on GPUs of the same major version and minor >= Y; PTX (compute_XY) is
  compiled by the driver for any GPU of capability >= XY. torch's own check (`torch.cuda._check_cubins`) only
  warns, and the first kernel then fails deep inside a collective; here a rank stops at start with one line.
- DALI's wheels name their CUDA major (`nvidia-dali-cuda120`, `nvidia-dali-cuda130`); CUDA 13 builds start at
  Turing (sm_75), CUDA 12 builds at sm_50 (DALI's support matrix).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UserError

BF16_MIN_CAPABILITY = (8, 0)
# DALI's CUDA major -> the lowest compute capability its wheels carry kernels for (DALI's support matrix)
DALI_MIN_CAPABILITY = {11: (3, 5), 12: (5, 0), 13: (7, 5)}
# (substring of the device name, dense bf16 FLOP/s, dense fp16 FLOP/s): NVIDIA's datasheets, tensor cores,
# without sparsity. More specific names first (an "H100 PCIe" is also an "H100").
PEAK_FLOPS: list[tuple[str, float | None, float]] = [
    ("H200 NVL", 835e12, 835e12),
    ("H200", 989e12, 989e12),
    ("H100 PCIe", 756e12, 756e12),
    ("H100 NVL", 835e12, 835e12),
    ("H100", 989e12, 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12, 312e12),
    ("V100S", None, 130e12),
    ("V100-PCIE", None, 112e12),
    ("V100", None, 125e12),  # SXM2; no bf16
]
INSTALL_HINT = {
    "volta": "on V100 (sm_70) nodes install the CUDA 12.6 build of torch and nvidia-dali-cuda120: "
    "SWIN_CUDA=cu126 scripts/ensure_venv.sh (docs/clusters.md: GPUs)",
    "default": "install a torch build whose arch list covers it (docs/clusters.md: GPUs)",
}


class UnsupportedGPU(UserError, RuntimeError):
    """The installed torch or DALI build has no kernels for this rank's GPU."""


@dataclass(frozen=True)
class Gpu:
    name: str
    capability: tuple[int, int]

    @property
    def sm(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"


def current_gpu(index: int | None = None) -> Gpu:
    import torch

    index = torch.cuda.current_device() if index is None else index
    major, minor = torch.cuda.get_device_capability(index)
    return Gpu(torch.cuda.get_device_name(index), (major, minor))


def precision_for(gpu: Gpu) -> str:
    """`auto`'s choice on this GPU: bf16 from Ampere on, fp16 (dynamic loss scaling) below."""
    return "bf16" if gpu.capability >= BF16_MIN_CAPABILITY else "fp16"


def check_precision(precision: str, gpu: Gpu) -> None:
    if precision == "bf16" and gpu.capability < BF16_MIN_CAPABILITY:
        raise UnsupportedGPU(
            f"train.precision=bf16 on {gpu.name} ({gpu.sm}): bf16 needs compute capability 8.0 "
            f"(A100, H100) or newer; use train.precision=fp16 or auto"
        )


def _arch_number(arch: str) -> tuple[int, int]:
    digits = re.sub(r"[^0-9]", "", arch.split("_", 1)[1])
    return int(digits[:-1]), int(digits[-1])


def has_kernels(gpu: Gpu, arch_list: list[str]) -> bool:
    """Whether a torch build with these CUDA arch flags has kernels that run on `gpu`.

    Whether a build with these arch flags (torch._C._cuda_getArchFlags(): sm_80, sm_90a, compute_120, ...)
    runs on the GPU: a cubin of the same major and a lower or equal minor (not an arch-specific `a` build of
    another minor), or PTX of a lower or equal capability."""
    major, minor = gpu.capability
    for arch in arch_list:
        kind, _, rest = arch.partition("_")
        if not rest or not rest[:1].isdigit():
            continue
        number = _arch_number(arch)
        if (
            kind == "sm"
            and number[0] == major
            and number[1] <= minor
            and (not rest.endswith(("a", "f")) or number[1] == minor)
        ):
            return True
        if kind == "compute" and number <= (major, minor):
            return True
    return False


def torch_arch_list() -> list[str]:
    """The archs the installed torch carries kernels for (readable without a GPU, unlike get_arch_list)."""
    import torch

    if torch.version.cuda is None or not hasattr(torch._C, "_cuda_getArchFlags"):
        return []
    return (torch._C._cuda_getArchFlags() or "").split()


def check_torch_kernels(gpu: Gpu, arch_list: list[str], torch_version: str) -> None:
    if arch_list and not has_kernels(gpu, arch_list):
        hint = INSTALL_HINT["volta" if gpu.capability[0] == 7 and gpu.capability < (7, 5) else "default"]
        raise UnsupportedGPU(
            f"torch {torch_version} has no kernels for {gpu.name} ({gpu.sm}): its build carries "
            f"{' '.join(arch_list)}; {hint}"
        )


def dali_package() -> tuple[str, str] | None:
    """(distribution name, version) of the installed DALI wheel (nvidia-dali-cuda120, -cuda130, ...), or None."""
    from importlib.metadata import distributions

    for dist in distributions():
        name = (dist.metadata["Name"] or "").lower()
        if re.fullmatch(r"nvidia-dali-cuda\d+", name):
            return name, dist.version
    return None


def dali_cuda_major(package: str) -> int:
    """12 for nvidia-dali-cuda120, 13 for nvidia-dali-cuda130."""
    match = re.fullmatch(r"nvidia-dali-cuda(\d+)", package)
    if match is None:  # a bug: callers pass what dali_package() found
        raise ValueError(f"not a DALI wheel name: {package!r}")
    return int(match.group(1)) // 10


def check_dali_kernels(gpu: Gpu, package: str, version: str, torch_cuda: str | None = None) -> None:
    low = DALI_MIN_CAPABILITY.get(dali_cuda_major(package))
    if low is not None and gpu.capability < low:
        raise UnsupportedGPU(
            f"{package} {version} has no kernels for {gpu.name} ({gpu.sm}): its CUDA "
            f"{dali_cuda_major(package)} build starts at sm_{low[0]}{low[1]}; "
            f"{INSTALL_HINT['volta' if gpu.capability[0] == 7 else 'default']}"
        )


def peak_flops(gpu_name: str, precision: str) -> float | None:
    """Dense tensor-core FLOP/s of this GPU kind in bf16 or fp16 (None: not in the table, or fp32)."""
    for key, bf16, fp16 in PEAK_FLOPS:
        if key.lower() in gpu_name.lower():
            return {"bf16": bf16, "fp16": fp16}.get(precision)
    return None


def mfu(images_per_s_per_gpu: float, forward_flops_per_image: float, peak: float) -> float:
    """Model FLOPs utilisation: trained images/s x 3 forward passes' FLOPs (forward + backward) / peak FLOP/s."""
    return images_per_s_per_gpu * 3 * forward_flops_per_image / peak


def memory_fields(device) -> dict[str, float]:
    """This rank's peak GPU memory since the last call and the allocator's retries, with no GPU wait.

    This rank's peak memory allocated and reserved since the last call (GB) and the allocator's retries so far
    (cudaMalloc failures it answered by freeing its cache: a sign of fragmentation or a batch at the limit).
    Host-side allocator counters: reading them does not wait for the GPU."""
    import torch

    stats = torch.cuda.memory_stats(device)
    out = {
        "mem_peak_allocated_gb": stats.get("allocated_bytes.all.peak", 0) / 1e9,
        "mem_peak_reserved_gb": stats.get("reserved_bytes.all.peak", 0) / 1e9,
        "alloc_retries": int(stats.get("num_alloc_retries", 0)),
    }
    torch.cuda.reset_peak_memory_stats(device)
    return out
