"""The cost profile of a candidate source model, so that users can pick one under size and latency budgets.

Accuracy is only half of choosing a pre-trained source: a model that transfers two points better but is ten
times larger, slower or hungrier for training memory may not fit the budget. This module measures, for any
`torch.nn.Module` that takes a `(N, 3, H, W)` batch (every timm model, with or without a classifier), or a
`(N, L)` batch of token ids for a text model (`transferlab.models.text_encoder`; the "image size" is then the length L):

- `count_parameters`: the number of parameters (size on disk / in memory).
- `flops_per_image`: forward FLOPs of one image, counted by torch's `FlopCounterMode`.
- `train_flops_per_image`: forward + backward FLOPs of one training image, frozen parts charged forward only
  (`transferlab.training.rules.TRAINING_COMPUTE_RULE`: the one definition of training compute).
- `train_step_memory_bytes`: a deterministic estimate of the peak memory of one AdamW training step.
- `latency_ms`: measured wall time per image of an inference forward pass.
- `cost_profile`: all of the above, split into a deterministic part (fit for reproducible metrics files)
  and a timed part (wall time, which varies from run to run and from machine to machine).

No function here changes the caller's model: parameters, buffers and train/eval flags are left as they were.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "cost_profile",
    "count_parameters",
    "flops_per_image",
    "latency_ms",
    "train_flops_per_image",
    "train_step_memory_bytes",
]


_IN_CHANS = 3


def _check_positive(name: str, value: int) -> None:
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model lives and which floating dtype its input should have (CPU float32 if it has no params)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def example_input(model: nn.Module, image_size: int) -> torch.Tensor:
    """One fixed example for counting FLOPs: a (1, 3, size, size) image, or (1, size) token ids for a text model."""
    return _random_batch(model, 1, image_size, seed=0)


def _random_batch(model: nn.Module, batch_size: int, image_size: int, seed: int) -> torch.Tensor:
    """A standard-normal (batch, 3, size, size) batch from a private generator (the global RNG is untouched)."""
    device, dtype = _device_and_dtype(model)
    gen = torch.Generator().manual_seed(seed)
    if getattr(model, "modality", "image") == "text":
        # A text model (transferlab.models.text_encoder): `image_size` is the sequence length; ids of
        # ordinary word-pieces.
        return torch.randint(1000, 2000, (batch_size, image_size), generator=gen).to(device)
    x = torch.randn(batch_size, _IN_CHANS, image_size, image_size, generator=gen)
    return x.to(device=device, dtype=dtype)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in eval mode, then restore every submodule's own `training` flag (not just the root's)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements of `model` (shared parameters counted once): the project's one count,
    behind a source's size (`cost_profile`), a model's `trainable_params` / `total_params` and evaluate@'s
    `params_millions`.

    Args:
        model: any module.
        trainable_only: count only the parameters that require a gradient.

    Returns:
        The number of parameter elements (all of them, or the trainable ones).
    """
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only))


def flops_per_image(model: nn.Module, image_size: int) -> int:
    """Forward FLOPs of one `3 x image_size x image_size` image, counted with torch's `FlopCounterMode`.

    The model runs once in eval mode under `torch.no_grad()` on a fixed random image; its flags are restored
    afterwards. torch counts a multiply-add as 2 FLOPs (so a conv costs `2 * Cout * Hout * Wout * Cin/groups *
    k * k`, a linear layer `2 * in * out`) and only counts the ops it has formulas for: convolutions, matrix
    multiplications and attention. Elementwise ops, bias additions, normalisation, activations and pooling are
    not counted. The count depends only on shapes, so it is deterministic.

    Args:
        model: a module taking a `(1, 3, image_size, image_size)` batch.
        image_size: side of the square input image in pixels.

    Returns:
        The forward FLOPs for a single image.
    """
    _check_positive("image_size", image_size)
    x = _random_batch(model, 1, image_size, seed=0)
    counter = FlopCounterMode(display=False)
    with _eval_mode(model), torch.no_grad(), counter:
        model(x)
    return int(counter.get_total_flops())


def train_flops_per_image(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Forward and backward FLOPs of one training example under `transferlab.training.rules.TRAINING_COMPUTE_RULE`.

    Every leaf module's forward FLOPs are measured in call order (torch's `FlopCounterMode`, eval mode,
    no_grad, the caller's flags restored). Leaves called after the first one with a trainable parameter pay 1x
    their forward FLOPs for the input gradient; leaves with trainable parameters pay 1x more for the weight
    gradient. FLOPs counted outside any leaf (an attention op inside a block's own forward) are charged for
    the input gradient whenever anything trains: an upper bound for them.

    Args:
        model: the network as it trains (its `requires_grad` flags set by the strategy).
        example: one input batch of size 1 (an image, token ids or a feature vector).

    Returns:
        {'forward', 'backward', 'total'}: integer FLOPs per example.
    """
    counter = FlopCounterMode(display=False)
    calls: list[tuple[int, bool]] = []  # (forward FLOPs, has trainable params) per leaf call, in order
    starts: dict[int, int] = {}

    def pre(module: nn.Module, _inputs: object) -> None:
        starts[id(module)] = counter.get_total_flops()

    def post(module: nn.Module, _inputs: object, _output: object) -> None:
        trainable = any(p.requires_grad for p in module.parameters(recurse=False))
        calls.append((counter.get_total_flops() - starts.pop(id(module)), trainable))

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_pre_hook(pre) for m in leaves] + [m.register_forward_hook(post) for m in leaves]
    try:
        with _eval_mode(model), torch.no_grad(), counter:
            model(example)
    finally:
        for h in handles:
            h.remove()
    forward = int(counter.get_total_flops())
    first = next((i for i, (_, t) in enumerate(calls) if t), None)
    if first is None:
        return {"forward": forward, "backward": 0, "total": forward}
    input_grads = sum(f for f, _ in calls[first + 1 :])
    weight_grads = sum(f for f, t in calls if t)
    outside = forward - sum(f for f, _ in calls)
    backward = int(input_grads + weight_grads + outside)
    return {"forward": forward, "backward": backward, "total": forward + backward}


def _training_copy(model: nn.Module, num_classes: int) -> nn.Module:
    """A deep copy in train mode with every parameter trainable and a fresh classifier if it had none."""
    m = copy.deepcopy(model)
    if getattr(m, "num_classes", 0) == 0 and hasattr(m, "reset_classifier"):
        m.reset_classifier(num_classes)
    for p in m.parameters():
        p.requires_grad_(True)
    return m.train()


def _storage_key(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # tensors without a plain storage
        return None


def train_step_memory_bytes(model: nn.Module, image_size: int, batch_size: int = 32, num_classes: int = 10) -> dict:
    """Deterministic estimate of the peak memory of one training step (AdamW, all parameters trainable).

    Counts, on a deep copy of `model` (the caller's model is not touched; a timm model with
    `num_classes=0` gets a fresh linear head of `num_classes` outputs via `reset_classifier`):

    - parameters: `sum(numel * element_size)` over the copy's parameters (buffers are not counted);
    - optimizer state: gradients plus AdamW's two moment buffers, i.e. exactly 3x the parameter bytes
      (so parameters + optimizer state = 4x the parameter bytes);
    - activations: every tensor autograd saves for backward during the forward pass (and the cross-entropy
      loss) of one random batch in train mode, captured with `torch.autograd.graph.saved_tensors_hooks`.
      Each distinct storage counts once (deduplicated by `untyped_storage().data_ptr()`) with its full size
      (`untyped_storage().nbytes()`, which is `numel * element_size` for a plain tensor and counts a saved view
      by the memory it keeps alive). Storages of parameters, buffers and of the input batch and labels are
      excluded, being counted elsewhere;
    - the input batch: the images and the int64 labels.

    It ignores allocator fragmentation, temporaries freed during the forward pass, the backward pass's own
    transient buffers and framework overhead, so it is a lower-bound style estimate that ranks models
    consistently rather than a prediction of RSS. It uses only shapes and a seeded generator (the global RNG
    state is preserved), so repeated calls return the same numbers.

    Args:
        model: a module taking a `(N, 3, H, W)` batch; a timm model with or without a classifier.
        image_size: side of the square input images in pixels.
        batch_size: training batch size.
        num_classes: outputs of the fresh head given to a model without a classifier.

    Returns:
        A dict of ints: `params_bytes`, `optimizer_state_bytes` (gradients + 2 Adam moments),
        `activation_bytes`, `input_bytes` (images + labels) and `total_bytes` (the sum of the four).
    """
    _check_positive("image_size", image_size)
    _check_positive("batch_size", batch_size)
    _check_positive("num_classes", num_classes)
    m = _training_copy(model, num_classes)

    params = list(m.parameters())
    params_bytes = int(sum(p.numel() * p.element_size() for p in params))
    excluded = {_storage_key(t) for t in [*params, *m.buffers()]}

    x = _random_batch(m, batch_size, image_size, seed=0)
    excluded.add(_storage_key(x))
    seen: dict[int, int] = {}
    rng_devices = [x.device.index or 0] if x.device.type == "cuda" else []

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key is not None and key not in excluded and key not in seen:
            seen[key] = int(t.untyped_storage().nbytes())
        return t

    with torch.random.fork_rng(devices=rng_devices), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.manual_seed(0)  # dropout / drop-path masks: fixed, and the caller's RNG is restored on exit
        out = m(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.dim() == 2:
            gen = torch.Generator().manual_seed(1)
            y = torch.randint(0, out.shape[1], (batch_size,), generator=gen).to(out.device)
            excluded.add(_storage_key(y))
            loss = nn.functional.cross_entropy(out, y)
            labels_bytes = y.numel() * y.element_size()
        else:
            loss = out.float().mean()
            labels_bytes = 0
    activation_bytes = int(sum(n for k, n in seen.items() if k not in excluded))
    del loss, out  # free the graph (and the saved tensors) before returning

    input_bytes = int(x.numel() * x.element_size() + labels_bytes)
    optimizer_state_bytes = 3 * params_bytes
    return {
        "params_bytes": params_bytes,
        "optimizer_state_bytes": optimizer_state_bytes,
        "activation_bytes": activation_bytes,
        "input_bytes": input_bytes,
        "total_bytes": params_bytes + optimizer_state_bytes + activation_bytes + input_bytes,
    }


def latency_ms(
    model: nn.Module,
    image_size: int | None,
    batch_size: int,
    *,
    repeats: int = 10,
    warmup: int = 2,
    seed: int = 0,
    example: torch.Tensor | None = None,
) -> float:
    """Median wall time per image, in milliseconds, of an inference forward pass at `batch_size`: the
    project's one latency timer (a candidate source's cost, evaluate@'s deployed model).

    Runs `warmup` untimed then `repeats` timed forward passes in eval mode under `torch.no_grad()` on one
    batch (on the model's device, synchronising CUDA), takes the median of the per-pass times and divides it
    by `batch_size`. The batch is random, `(batch_size, 3, image_size, image_size)` (token ids of length
    `image_size` for a text model), or the first `batch_size` rows of `example`, tiled when it has fewer. The
    model's flags are restored afterwards; it is timed where it is (move it to the CPU to time the CPU).

    This is wall time: it varies from run to run, with machine load, thread count and hardware, so keep it out
    of reproducible metrics files (see `cost_profile`, which returns it separately).

    Args:
        model: a module taking a `(N, 3, H, W)` batch (or `(N, L)` token ids).
        image_size: side of the square input images in pixels; unused (may be None) with `example`.
        batch_size: images per forward pass.
        repeats: timed forward passes (the median is taken over them).
        warmup: untimed forward passes before timing.
        seed: seed of the random input batch.
        example: real inputs to time instead of a random batch (images or token ids, as the model takes them).

    Returns:
        The median milliseconds per image.
    """
    _check_positive("batch_size", batch_size)
    _check_positive("repeats", repeats)
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup!r}")
    if example is None:
        if image_size is None:
            raise ValueError("image_size must be a positive integer when no example batch is given, got None")
        _check_positive("image_size", image_size)
        x = _random_batch(model, batch_size, image_size, seed=seed)
    else:
        if len(example) == 0:
            raise ValueError("example holds no inputs to time")
        x = example[:batch_size]
        if len(x) < batch_size:
            x = x.repeat(-(-batch_size // len(x)), *([1] * (x.dim() - 1)))[:batch_size]
        device, dtype = _device_and_dtype(model)
        x = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
    device = x.device
    times: list[float] = []
    with _eval_mode(model), torch.no_grad():
        for _ in range(warmup):
            model(x)
        _sync(device)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            _sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0 / batch_size


def cost_profile(
    model: nn.Module,
    image_size: int,
    *,
    latency_repeats: int = 10,
    batch_size: int = 32,
    num_classes: int = 10,
) -> tuple[dict, dict]:
    """The cost profile of a candidate source model, split into a reproducible part and a timed part.

    Args:
        model: a module taking a `(N, 3, H, W)` batch; a timm model with or without a classifier.
        image_size: side of the square input images in pixels.
        latency_repeats: timed forward passes per latency measurement.
        batch_size: training batch size for the training-memory estimate.
        num_classes: head size used for the training-memory estimate of a model without a classifier.

    Returns:
        `(deterministic, timed)`. `deterministic` (identical on every call, safe for metrics files):
        `params` (of `model` as given), `params_millions` (rounded to 4 decimals), `flops_per_image`,
        `gflops_per_image` (rounded to 4), `train_step_memory_mb` and `activation_memory_mb` (MiB, i.e.
        bytes / 2**20, rounded to 2; see `train_step_memory_bytes`). `timed` (wall time, varies run to run):
        `latency_ms_batch1` and `latency_ms_batch32`, milliseconds per image at batch 1 and 32, rounded to 3.
    """
    params = count_parameters(model)
    flops = flops_per_image(model, image_size)
    mem = train_step_memory_bytes(model, image_size, batch_size=batch_size, num_classes=num_classes)
    deterministic = {
        "params": params,
        "params_millions": round(params / 1e6, 4),
        "flops_per_image": flops,
        "gflops_per_image": round(flops / 1e9, 4),
        "train_step_memory_mb": round(mem["total_bytes"] / 2**20, 2),
        "activation_memory_mb": round(mem["activation_bytes"] / 2**20, 2),
    }
    timed = {
        f"latency_ms_batch{b}": round(latency_ms(model, image_size, b, repeats=latency_repeats), 3) for b in (1, 32)
    }
    return deterministic, timed
