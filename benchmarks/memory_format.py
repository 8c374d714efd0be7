"""channels_last against contiguous on this device: ``python -m benchmarks.memory_format``

The engine trains in channels_last on every device (`bdat_ray.engine.prepare`). This times,
for each model of the registry at its usual image shape, one training step's forward and
backward (cross-entropy, batch ``--batch``) with model and images in each memory format, in
alternating rounds so that a change of load hits both alike, and prints milliseconds per
step (the median over rounds) as Markdown. One thread by default: what each Ray trial of a
CPU sweep gets (``resources: {cpu: 1}``).

    python -m benchmarks.memory_format                  # every model, 1 thread
    python -m benchmarks.memory_format --threads 2 --models small_cnn resnet32
    python -m benchmarks.memory_format --fit at.threat=linf at.linf.eps=16/255 train.epochs=4

``--fit KEY=VALUE ...`` instead times whole `engine.fit` runs of that config (defaults as
the run CLI), alternating the engine as it is with the engine switched back to contiguous
tensors (model and batches; `contiguous_engine`), ``--rounds`` times each.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from bdat_ray.cli import main_guard, positive
from bdat_ray.models import MODELS, build_model

#: The image shape each model is trained on in this project (channels, side).
SHAPES = {
    "small_cnn": (1, 16),  # digits at 16x16 (the quickstart)
    "madry_mnist_cnn": (1, 28),
    "madry_resnet32": (3, 32),
    "preact_resnet18": (3, 32),
    "resnet18": (3, 32),
    "resnet32": (3, 32),
}
#: The largest batch timed: 8192 CIFAR-sized images are 100 MB of input alone.
MAX_BATCH = 8192
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def step_ms(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
    return 1000 * (time.perf_counter() - start) / iters


@contextlib.contextmanager
def contiguous_engine() -> Iterator[None]:
    """The engine as it was before channels_last on CPU: `Module.to` ignores a requested
    memory format and batches are made contiguous (`to_float`, where the engine imports it)."""
    import bdat_ray.data.augment as augment_module
    import bdat_ray.engine as engine
    import bdat_ray.metrics as metrics

    module_to, to_float = torch.nn.Module.to, augment_module.to_float

    def plain_to(self, *args, **kwargs):
        kwargs.pop("memory_format", None)
        return module_to(self, *args, **kwargs)

    def plain_to_float(x, channels_last):
        return to_float(x, False)

    torch.nn.Module.to = plain_to
    for module in (augment_module, engine, metrics):
        module.to_float = plain_to_float
    try:
        yield
    finally:
        torch.nn.Module.to = module_to
        for module in (augment_module, engine, metrics):
            module.to_float = to_float


def time_fits(overrides: list[str], rounds: int) -> None:
    from bdat_ray.config import build_config
    from bdat_ray.data import load_dataset
    from bdat_ray.engine import fit

    cfg = build_config(None, overrides)
    data = load_dataset(cfg.data)
    seconds: dict[str, list[float]] = {f: [] for f in FORMATS}
    for _ in range(rounds):
        for label in FORMATS:
            with contiguous_engine() if label == "contiguous" else contextlib.nullcontext():
                start = time.perf_counter()
                fit(cfg, data=data)
                seconds[label].append(time.perf_counter() - start)
    plain, last = (statistics.median(seconds[f]) for f in FORMATS)
    print(f"engine.fit {' '.join(overrides)}: median of {rounds} rounds\n")
    print("| contiguous s | channels_last s | speed-up | rounds contiguous / channels_last |")
    print("|---|---|---|---|")
    rows = " / ".join(", ".join(f"{t:.1f}" for t in seconds[f]) for f in FORMATS)
    print(f"| {plain:.1f} | {last:.1f} | {plain / last:.2f}× | {rows} |")


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory_format", description=__doc__)
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=sorted(MODELS))
    p.add_argument("--batch", type=positive, default=128)
    p.add_argument("--threads", type=positive, default=1)
    p.add_argument("--iters", type=positive, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=positive, default=3)
    p.add_argument("--fit", nargs="+", metavar="KEY=VALUE", help="time engine.fit runs instead")
    args = p.parse_args(argv)
    if args.batch > MAX_BATCH:  # before any tensor is allocated
        p.error(f"--batch: at most {MAX_BATCH} images a step; got {args.batch}")
    if args.threads > (os.cpu_count() or 1):
        p.error(f"--threads: at most this machine's {os.cpu_count()} cores; got {args.threads}")
    torch.set_num_threads(args.threads)
    if args.fit:
        time_fits(args.fit, args.rounds)
        return 0
    print(f"{args.threads} thread(s), batch {args.batch}, median of {args.rounds} rounds\n")
    print("| model | image | contiguous ms | channels_last ms | speed-up |")
    print("|---|---|---|---|---|")
    for name in args.models:
        channels, side = SHAPES[name]
        torch.manual_seed(0)
        x = torch.rand(args.batch, channels, side, side)
        y = torch.randint(0, 10, (args.batch,))
        model = build_model(name, num_classes=10, in_channels=channels).train()
        times: dict[str, list[float]] = {f: [] for f in FORMATS}
        for _ in range(args.rounds):
            for label, memory_format in FORMATS.items():
                model = model.to(memory_format=memory_format)
                images = x.contiguous(memory_format=memory_format)
                step_ms(model, images, y, 1)  # warm-up: oneDNN picks its kernels
                times[label].append(step_ms(model, images, y, args.iters))
        plain, last = (statistics.median(times[f]) for f in FORMATS)
        print(
            f"| {name} | {channels}×{side}×{side} | {plain:.0f} | {last:.0f} | "
            f"{plain / last:.2f}× |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
