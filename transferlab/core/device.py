"""Where tensors live: `train.device` (auto | cpu | cuda | cuda:N) resolved to a torch.device at run time,
and the mixed-precision helpers that go with it.

* `resolve_device("auto")` takes CUDA when `torch.cuda.is_available()`, else the CPU. It is resolved when a
  stage runs, never while params are validated (validation must not import torch: see `DEVICE_PATTERN`).
* On CUDA, training and inference run under autocast: bfloat16 where the card supports it (no loss
  scaling needed), else float16 with a `torch.amp.GradScaler`.
* On the CPU nothing changes: no autocast, a disabled scaler (its `scale`, `unscale_`, `step` and `update`
  are pass-throughs), float32 throughout, so CPU results stay bit-identical to the pre-device code.

torch is imported inside the functions: stage modules import this one before their params are validated.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferlab.params import DEVICE_CHOICES, DEVICE_PATTERN

if TYPE_CHECKING:
    import torch

# The values `train.device` accepts; checked by params validation without torch.


class DeviceError(ValueError):
    """`train.device` names a device this machine does not have; the message says what to set instead."""


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch.device that `train.device` means on this machine.

    Args:
        spec: "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:N", or a torch.device
            (returned as is). None means "auto".

    Returns:
        The device to put models and batches on.

    Raises:
        DeviceError: a string outside auto | cpu | cuda | cuda:N, or a CUDA device this machine lacks.
    """
    import torch

    if isinstance(spec, torch.device):
        return spec
    spec = "auto" if spec is None else str(spec)
    if not DEVICE_PATTERN.fullmatch(spec):
        raise DeviceError(f"train.device: '{spec}' is not a device (expected {DEVICE_CHOICES})")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    # Before the first CUDA work, whichever stage resolves first (see transferlab.core.seeding).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if spec == "auto":
        return torch.device("cuda")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"train.device: '{spec}' asks for a CUDA GPU, but torch {torch.__version__} sees none (CUDA build: "
            f"{torch.version.cuda or 'none'}). Set train.device: auto (the GPU when there is one, else the CPU) "
            "or cpu; or, for the GPU, check the driver with `nvidia-smi` and install a CUDA build of torch."
        )
    index = int(spec.split(":")[1]) if ":" in spec else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise DeviceError(
            f"train.device: '{spec}' but this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1}); "
            "set train.device: cuda (the first one) or auto"
        )
    return torch.device(spec)


def as_device(device: str | torch.device | None) -> torch.device:
    """A library function's `device` keyword as a torch.device: None means the CPU (the default everywhere,
    so callers that never heard of devices keep working unchanged)."""
    import torch

    return torch.device("cpu") if device is None else torch.device(device)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype on `device`: bfloat16 on CUDA cards that support it, else float16; None on the CPU
    (no mixed precision there)."""
    import torch

    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast_context(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed precision for forward passes on CUDA (see `amp_dtype`); a no-op context on the CPU, or when
    `enabled` is False."""
    import torch

    dtype = amp_dtype(device) if enabled else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def make_grad_scaler(device: torch.device, enabled: bool = True) -> torch.amp.GradScaler:
    """A loss scaler: active only for float16 autocast on CUDA (bfloat16 has float32's range and needs none).

    A disabled scaler is a pass-through: `scale(loss)` is `loss`, `unscale_` and `update` do nothing,
    `step(opt)` is `opt.step()`; the CPU path is therefore exactly the plain loop.
    """
    import torch

    active = enabled and amp_dtype(device) == torch.float16
    return torch.amp.GradScaler("cuda" if active else "cpu", enabled=active)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else `platform.processor()`), or 'unknown'."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# What decides a run's floating point, beside the inputs: equal fingerprints promise bit-identical outputs,
# different ones only statistically equal outputs (README "Reproducibility"; `provenance.review` says which).
NUMERICS_KEYS = ("device", "gpu_name", "cpu_model", "machine", "torch", "threads", "mkldnn")


def device_info(device: torch.device) -> dict[str, Any]:
    """What a run used, for `perf/` JSON and MLflow tags (never for metrics/: they stay device-free): the device
    and the numerics fingerprint (`NUMERICS_KEYS`: CPU model, architecture, torch version, threads, oneDNN)."""
    import platform

    import torch

    info: dict[str, Any] = {
        "device": str(device),
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
    }
    if device.type == "cuda":
        dtype = amp_dtype(device)
        info["gpu_name"] = torch.cuda.get_device_name(device)
        info["amp_dtype"] = str(dtype).removeprefix("torch.") if dtype is not None else None
        info["cuda_version"] = torch.version.cuda
    return info


def device_tags(device: torch.device) -> dict[str, str]:
    """`device_info` as MLflow tags (strings, `device.` prefix on the extras)."""
    info = device_info(device)
    return {("device" if k == "device" else f"device.{k}"): str(v) for k, v in info.items()}
