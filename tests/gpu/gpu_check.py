"""The Python half of `tests/gpu/gpu_check.sh`: a tiny end-to-end `dvc repro` with `train.device: cuda`, and
the training throughput of EfficientNet-Lite0 (48 px, batch 32) on CUDA with and without mixed precision and
on the CPU, printed as one table.

    python tests/gpu/gpu_check.py pipeline     # tiny pipeline in a temp copy of the repo, device: cuda
    python tests/gpu/gpu_check.py throughput   # img/s rows
    python tests/gpu/gpu_check.py all          # both (what gpu_check.sh runs)

Exits 2 with a message when torch sees no CUDA GPU: this script checks the GPU path and nothing else.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_repo: the end-to-end test's tiny project


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        print(
            f"gpu_check: torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}) sees no CUDA GPU. "
            "Run this on a machine with an NVIDIA GPU and driver (`nvidia-smi -L` lists it).",
            file=sys.stderr,
        )
        raise SystemExit(2)


def _sh(cmd: list[str], cwd: Path) -> None:
    from tiny_repo import sh

    try:
        sh(*cmd, cwd=cwd)
    except AssertionError as exc:
        raise SystemExit(str(exc)) from None


def tiny_repo(repo: Path) -> None:
    """The tiny project of tests/tiny_repo.py (the end-to-end test's), with `train.device: cuda`."""
    from tiny_repo import build

    build(repo, train_device="cuda")


def run_pipeline() -> list[tuple[str, str, str]]:
    """`dvc repro` of the tiny config on CUDA; rows (measurement, value, note)."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        repo = Path(tmp)
        tiny_repo(repo)
        t = time.perf_counter()
        _sh([sys.executable, "-m", "dvc", "repro"], repo)
        seconds = time.perf_counter() - t
        rows = [("tiny pipeline, dvc repro (train.device: cuda)", f"{seconds:.1f} s", "every stage ran")]
        for f in sorted((repo / "perf/train").glob("*.json")):
            perf = json.loads(f.read_text())
            if perf.get("device", "").split(":")[0] != "cuda":
                raise SystemExit(f"gpu_check: {f.name} records device {perf.get('device')!r}, not cuda")
            rows.append(
                (f"train@{f.stem}", f"{perf['train_seconds_total']:.1f} s", f"{perf['device']} {perf.get('gpu_name')}")
            )
        summary = json.loads((repo / "metrics/summary.json").read_text())
        rows.append(("metrics/summary.json strategies", str(len(summary["strategies"])), "compare ran"))
        return rows


def throughput(device_name: str, amp: bool, steps: int, size: int = 48, batch: int = 32) -> float:
    """Training images/s of lite0 (bare forward + backward + AdamW step on one in-memory batch)."""
    import timm
    import torch

    from transferlab.core.device import autocast_context, make_grad_scaler

    device = torch.device(device_name)
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10).to(device).train()
    x = torch.randn(batch, 3, size, size).to(device)
    y = torch.randint(0, 10, (batch,)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = make_grad_scaler(device, enabled=amp)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> None:
        with autocast_context(device, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(3):  # warm-up: allocations, kernel selection
        step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * batch / (time.perf_counter() - t)


def run_throughput(gpu_steps: int, cpu_steps: int) -> list[tuple[str, str, str]]:
    import torch

    from transferlab.core.device import amp_dtype

    cuda = torch.device("cuda")
    dtype = str(amp_dtype(cuda)).removeprefix("torch.")
    rows = []
    rates = {}
    for label, dev, amp, steps in (
        (f"CUDA, AMP ({dtype})", "cuda", True, gpu_steps),
        ("CUDA, fp32", "cuda", False, gpu_steps),
        ("CPU, fp32", "cpu", False, cpu_steps),
    ):
        rates[label] = throughput(dev, amp, steps)
        rows.append((f"lite0 train step 48 px batch 32: {label}", f"{rates[label]:.0f} img/s", f"{steps} steps"))
    cpu = rates["CPU, fp32"]
    for label in list(rates)[:2]:
        rows.append(
            (f"speed-up vs CPU: {label}", f"{rates[label] / cpu:.1f}x", f"{torch.get_num_threads()} CPU threads")
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["pipeline", "throughput", "all"], nargs="?", default="all")
    p.add_argument("--gpu-steps", type=int, default=50)
    p.add_argument("--cpu-steps", type=int, default=5)
    args = p.parse_args()
    require_cuda()
    import torch

    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: {torch.cuda.get_device_name(0)}", flush=True)
    rows: list[tuple[str, str, str]] = []
    if args.what in ("pipeline", "all"):
        rows += run_pipeline()
    if args.what in ("throughput", "all"):
        rows += run_throughput(args.gpu_steps, args.cpu_steps)
    print("\n| measurement | value | note |\n|---|---:|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


if __name__ == "__main__":
    main()
