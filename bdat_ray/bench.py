"""``python -m bdat_ray.bench``: images/s of a training step, our pipeline vs the naive one.

    python -m bdat_ray.bench                                       # digits + small CNN
    python -m bdat_ray.bench data.name=npz data.path=cifar10-subset.npz model.name=preact_resnet18
    python -m bdat_ray.bench --compile                             # ours eager vs torch.compile

Measures, on the configured device and data, a clean training step and a PGD-k adversarial
training step, each done two ways:

- **ours**: the engine's own step — uint8 data resident on the device, batched crop/flip,
  channels_last, bf16 autocast on CUDA, weights frozen during attack steps;
- **naive**: a torch DataLoader over per-sample torchvision transforms on PIL images, fp32,
  and attack steps that call ``loss.backward()`` and so also build weight gradients.

Prints both and their ratio, then one JSON line. ``--compile`` instead puts the engine's step
eager beside the same step under ``train.compile=on`` (and ``--fused`` times fused trials).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bdat_ray.cli import config_parser, integer_at_least, main_guard, positive
from bdat_ray.config import ConfigError, build_config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(step: Callable[[], int], iters: int, warmup: int, device: torch.device) -> float:
    """images/s of ``step`` (returns the images it processed) after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    images = sum(step() for _ in range(iters))
    _sync(device)
    return images / (time.perf_counter() - t0)


def ours(
    prep, pgd_steps: int, adversarial: bool, model: torch.nn.Module | None = None
) -> Callable[[], int]:
    """One step of the engine's real training loop (`train_epoch` body) on ``model`` (default
    the prepared one; `compile_rows` hands in a compiled copy)."""
    from bdat_ray.data.augment import augment, shuffled_batches, to_float
    from bdat_ray.engine import make_optimizer
    from bdat_ray.threats import THREATS
    from bdat_ray.threats.objective import AdversarialTraining, StandardTraining

    cfg = prep.cfg
    model = model if model is not None else prep.model
    optimizer, _ = make_optimizer(model, cfg)
    threat = THREATS["linf"](8 / 255, pgd_steps, 2 / 255, random_start=True)
    objective = AdversarialTraining([(threat, 1.0)]) if adversarial else StandardTraining()
    gen = torch.Generator(prep.device).manual_seed(0)
    data = prep.poisoned.data
    batches = iter(())

    def step() -> int:
        nonlocal batches
        idx = next(batches, None)
        if idx is None:
            batches = shuffled_batches(len(data.y_train), cfg.train.batch_size, gen, prep.device)
            idx = next(batches)
        x = to_float(augment(data.x_train[idx], prep.augment_mode, gen), prep.channels_last)
        out = objective.batch_loss(model, x, data.y_train[idx], gen, prep.amp_dtype)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        return len(idx)

    model.train()
    return step


def naive(prep, model, pgd_steps: int, adversarial: bool, workers: int) -> Callable[[], int]:
    """The common tutorial pipeline: PIL images, per-sample transforms, fp32, and a PGD loop
    whose ``loss.backward()`` builds weight gradients it then throws away."""
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    data = prep.poisoned.data
    x_cpu, y_cpu = data.x_train.cpu(), data.y_train.cpu()
    mode = "L" if x_cpu.shape[1] == 1 else "RGB"
    size = x_cpu.shape[-1]
    ops = [transforms.RandomCrop(size, padding=4)]
    if prep.augment_mode == "crop_flip":
        ops.append(transforms.RandomHorizontalFlip())
    tf = transforms.Compose([*ops, transforms.ToTensor()])

    class PILDataset(Dataset):
        def __len__(self) -> int:
            return len(y_cpu)

        def __getitem__(self, i: int):
            array = x_cpu[i].permute(1, 2, 0).squeeze(-1).numpy()
            return tf(Image.fromarray(array, mode)), int(y_cpu[i])

    loader = DataLoader(
        PILDataset(),
        batch_size=prep.cfg.train.batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=prep.device.type == "cuda",
        drop_last=True,
        persistent_workers=workers > 0,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    eps, alpha = 8 / 255, 2 / 255
    batches = iter(())

    def step() -> int:
        nonlocal batches
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        x, y = (t.to(prep.device) for t in batch)
        if adversarial:
            delta = torch.empty_like(x).uniform_(-eps, eps)
            for _ in range(pgd_steps):
                delta.requires_grad_(True)
                loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
                loss.backward()  # also fills every weight's .grad: the cost we avoid
                delta = (delta + alpha * delta.grad.sign()).clamp(-eps, eps).detach()
            x = (x + delta).clamp(0, 1)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        return len(y)

    model.train()
    return step


def parser() -> argparse.ArgumentParser:
    p = config_parser("python -m bdat_ray.bench", __doc__.split("\n\n")[0])
    p.add_argument("--iters", type=positive, default=20, help="timed steps per measurement")
    p.add_argument(
        "--warmup", type=integer_at_least(0), default=5, help="untimed steps before timing"
    )
    p.add_argument("--pgd-steps", type=positive, default=10, help="k of the PGD-k AT step")
    p.add_argument(
        "--naive-workers", type=integer_at_least(0), default=2, help="DataLoader workers (naive)"
    )
    p.add_argument(
        "--fused",
        metavar="K,K,...",
        help="instead: trials/hour of K whole runs (train.seed 0..K-1) fused into one network "
        "vs the same K runs one after another, for each K (e.g. 1,2,4,8)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="instead: the engine's step eager vs under torch.compile (train.compile=on), "
        "alternating --rounds times, with the seconds the compiled warm-up took",
    )
    p.add_argument(
        "--rounds", type=positive, default=3, help="--compile: alternating timings of each (median)"
    )
    return p


def compile_rows(prep, pgd_steps: int, iters: int, warmup: int, rounds: int) -> dict:
    """Per step kind: images/s of the engine's step eager and compiled (`engine.compile_model`,
    the same settings a run uses), each on its own copy of the initial weights, timed in
    alternating rounds (median) so that load from other work hits both alike. Where the timed
    steps reach the epoch's short last batch, the warm-up covers a whole epoch, so every graph
    they use is built before timing; the warm-up's seconds, eager and compiled (their
    difference is the compiling), are reported beside the rates."""
    import statistics

    from torch._dynamo.utils import counters

    from bdat_ray.engine import compile_model

    n, batch = len(prep.poisoned.data.y_train), prep.cfg.train.batch_size
    per_epoch = -(-n // batch)
    if n % batch and warmup + rounds * iters >= per_epoch:
        warmup = max(warmup, per_epoch)  # the timed steps reach the short last batch: warm it
    rows = {}
    for kind, adversarial in (("clean", False), (f"pgd{pgd_steps}_at", True)):
        graphs_before = counters["stats"]["unique_graphs"]
        steps, warm_s = {}, {}
        for variant in ("eager", "compiled"):
            model = copy.deepcopy(prep.model)
            model = compile_model(model) if variant == "compiled" else model
            steps[variant] = ours(prep, pgd_steps, adversarial, model)
            t0 = time.perf_counter()
            for _ in range(warmup):
                steps[variant]()
            _sync(prep.device)
            warm_s[variant] = time.perf_counter() - t0
        rates = {v: [] for v in steps}
        for _ in range(rounds):
            for variant, step in steps.items():
                rates[variant].append(_rate(step, iters, 0, prep.device))
        eager, compiled = (statistics.median(rates[v]) for v in ("eager", "compiled"))
        rows[kind] = {
            "eager": eager,
            "compiled": compiled,
            "speedup": compiled / eager,
            "eager_rounds": rates["eager"],
            "compiled_rounds": rates["compiled"],
            "warmup_steps": warmup,
            "eager_warmup_s": warm_s["eager"],
            "compiled_warmup_s": warm_s["compiled"],
            "graphs": counters["stats"]["unique_graphs"] - graphs_before,
        }
    print(
        f"{'step':<12}{'eager img/s':>13}{'compiled img/s':>16}{'ratio':>8}"
        f"{'warm-up s eager / compiled':>30}{'graphs':>8}",
        file=sys.stderr,
    )
    for kind, r in rows.items():
        warm = f"{r['eager_warmup_s']:.1f} / {r['compiled_warmup_s']:.1f}"
        print(
            f"{kind:<12}{r['eager']:>13.1f}{r['compiled']:>16.1f}{r['speedup']:>7.2f}x"
            f"{warm:>30}{r['graphs']:>8}",
            file=sys.stderr,
        )
    return rows


def fused_rows(cfg, members: list[int]) -> list[dict[str, float]]:
    """Per K: seconds and trials/hour of `fused.fit_fused` on K runs vs `engine.fit` of the
    same K runs one after another (what one worker without fusion does)."""
    from bdat_ray.data import load_dataset
    from bdat_ray.engine import fit
    from bdat_ray.fused import fit_fused

    data = load_dataset(cfg.data)
    rows = []
    for k in members:
        cfgs = [cfg.replace({"train.seed": cfg.train.seed + i}) for i in range(k)]
        t0 = time.perf_counter()
        fit_fused(cfgs, data=data)
        fused = time.perf_counter() - t0
        t0 = time.perf_counter()
        for one in cfgs:
            fit(one, data=data)
        separate = time.perf_counter() - t0
        rows.append(
            {
                "k": k,
                "fused_s": fused,
                "separate_s": separate,
                "fused_trials_per_h": 3600 * k / fused,
                "separate_trials_per_h": 3600 * k / separate,
            }
        )
        print(
            f"K={k:<3} fused {fused:8.1f} s ({3600 * k / fused:7.1f} trials/h)   "
            f"separate {separate:8.1f} s ({3600 * k / separate:7.1f} trials/h)   "
            f"{separate / fused:5.2f}x",
            file=sys.stderr,
        )
    return rows


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = build_config(None, args.overrides)
    if args.fused:
        try:
            members = [int(k) for k in args.fused.split(",")]
        except ValueError:
            members = [0]
        if any(k < 1 for k in members):
            raise ConfigError("--fused", f"takes member counts ≥ 1 like 1,2,4,8; got {args.fused}")
        print(json.dumps({"fused": fused_rows(cfg, members), "config": cfg.to_flat()}))
        return 0
    from bdat_ray.engine import prepare

    prep = prepare(cfg.replace({"train.compile": "off"}) if args.compile else cfg)
    fresh_model = copy.deepcopy(prep.model).to(memory_format=torch.contiguous_format)
    dev = prep.device
    name = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    c = prep.cfg
    description = (
        f"device: {name}; data {c.data.name} {tuple(prep.poisoned.data.image_shape)}, "
        f"model {c.model.name}, batch {c.train.batch_size}, amp {c.train.amp}, "
        f"{args.iters} timed steps"
    )
    summary = {
        "device": name,
        "data": c.data.name,
        "model": c.model.name,
        "batch_size": c.train.batch_size,
        "amp": c.train.amp,
    }
    if args.compile:
        print(f"{description} x {args.rounds} alternating rounds", file=sys.stderr)
        compiled = compile_rows(prep, args.pgd_steps, args.iters, args.warmup, args.rounds)
        print(json.dumps({**summary, "compile": compiled}))
        return 0
    timing = {"warmup": args.warmup, "iters": args.iters, "device": dev}
    rows = {
        "clean": (
            _rate(ours(prep, args.pgd_steps, False), **timing),
            _rate(naive(prep, fresh_model, args.pgd_steps, False, args.naive_workers), **timing),
        ),
        f"pgd{args.pgd_steps}_at": (
            _rate(ours(prep, args.pgd_steps, True), **timing),
            _rate(naive(prep, fresh_model, args.pgd_steps, True, args.naive_workers), **timing),
        ),
    }
    print(description, file=sys.stderr)
    print(f"{'step':<12}{'ours img/s':>14}{'naive img/s':>14}{'speed-up':>10}", file=sys.stderr)
    for step, (fast, slow) in rows.items():
        print(f"{step:<12}{fast:>14.1f}{slow:>14.1f}{fast / slow:>9.2f}x", file=sys.stderr)
    summary |= {
        **{f"{s}_ours": f for s, (f, _) in rows.items()},
        **{f"{s}_naive": n for s, (_, n) in rows.items()},
        **{f"{s}_speedup": f / n for s, (f, n) in rows.items()},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
