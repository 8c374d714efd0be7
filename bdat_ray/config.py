"""Typed, frozen experiment configuration addressed by flat dotted keys.

One `Config` describes one poisoned-data training run. Every leaf has a type, a default, a
unit and a check, so bad input fails here — before any data is loaded or any GPU time spent —
with a `ConfigError` naming the key and what is allowed. The CLIs turn it into exit code 2.

Values arrive as strings (``KEY=VALUE`` on a command line, ``8/255`` in YAML) or as YAML
scalars. Numbers may be written as fractions (``at.eps=8/255``); they are parsed, never
evaluated. Conventions (docs/units): pixel values live in [0, 1], so L-inf / L2 budgets are in
pixel units; rates are fractions in [0, 1]; metrics are percent.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Check = Callable[[Any], str | None]


class ConfigError(ValueError):
    """Bad input. ``str(err)`` is one line: ``KEY: what is wrong and what is allowed``."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


# ---------------------------------------------------------------------------------------------
# Field declarations: a default plus help text, unit, choices and a value check.


def option(
    default: Any,
    help: str,
    *,
    unit: str = "",
    choices: Iterable[str] | Callable[[], Iterable[str]] | None = None,
    check: Check | None = None,
) -> Any:
    """A config leaf. ``choices`` may be a callable so registries are consulted lazily."""
    return field(
        default=default,
        metadata={"help": help, "unit": unit, "choices": choices, "check": check},
    )


def at_least(low: float) -> Check:
    return lambda v: None if v is None or v >= low else f"must be ≥ {low:g}"


def above(low: float) -> Check:
    return lambda v: None if v is None or v > low else f"must be > {low:g}"


def within(low: float, high: float) -> Check:
    return lambda v: None if v is None or low <= v <= high else f"must be in [{low:g}, {high:g}]"


def _registry_names(module: str, attr: str) -> Callable[[], list[str]]:
    def names() -> list[str]:
        import importlib

        return sorted(getattr(importlib.import_module(module), attr))

    return names


# ---------------------------------------------------------------------------------------------
# The schema. Sections are frozen dataclasses; `Config` nests them.


@dataclass(frozen=True)
class DataConfig:
    name: str = option(
        "digits",
        "dataset: digits is scikit-learn's bundled 8x8 digits upsampled (no download); npz takes "
        "x_train/y_train/x_test/y_test uint8 arrays; imagefolder takes DIR/train and DIR/test",
        choices=_registry_names("bdat_ray.data.sources", "SOURCES"),
    )
    path: str | None = option(
        None, "dataset root (mnist/cifar*/imagefolder) or file (npz); default ~/.cache/bdat_ray"
    )
    download: bool = option(False, "download mnist/cifar10/cifar100 into data.path if missing")
    image_size: int = option(
        16,
        "side length images are resized to, for digits (8x8 source) and imagefolder",
        unit="px",
        check=within(8, 512),
    )


@dataclass(frozen=True)
class ModelConfig:
    name: str = option(
        "small_cnn",
        "architecture (CIFAR variants with a 3x3 stem)",
        choices=_registry_names("bdat_ray.models", "MODELS"),
    )
    width: float = option(
        1.0, "channel width multiplier (Weng et al. Table 4 doubles it)", check=above(0)
    )
    norm: str = option(
        "batch", "normalisation layers (group for DPSGD, CAT paper §4)", choices=("batch", "group")
    )


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = option(15, "training epochs (the CAT paper uses 100)", check=at_least(1))
    batch_size: int = option(128, "mini-batch size", unit="images", check=at_least(1))
    lr: float = option(
        0.1, "initial SGD learning rate, divided by 10 at 60% and 90% of the epochs", check=above(0)
    )
    momentum: float = option(0.9, "SGD momentum", check=within(0, 1))
    weight_decay: float = option(5e-4, "SGD weight decay", check=at_least(0))
    seed: int = option(0, "seed of weights, data order, augmentation and attack starts")
    augment: str = option(
        "auto",
        "batched on-device augmentation: random crop (pad 4) and horizontal flip; auto = "
        "crop+flip for colour images (CAT paper), none for grey digits (Madry et al.'s MNIST "
        "setting; a crop also pushes small corner triggers out of the image)",
        choices=("auto", "none", "crop", "crop_flip"),
    )
    amp: str = option(
        "auto", "autocast dtype: auto = bf16 on CUDA, off on CPU", choices=("auto", "bf16", "off")
    )


@dataclass(frozen=True)
class BlendedConfig:
    alpha: float = option(
        0.2,
        "blend weight in x' = (1-α)x + α·t for training images (Chen et al. 2017)",
        check=lambda v: None if 0 < v < 1 else "must be in (0, 1)",
    )
    alpha_test: float | None = option(
        None,
        "blend weight for triggered test images; default: alpha",
        check=lambda v: None if v is None or 0 < v < 1 else "must be in (0, 1)",
    )
    trigger: str = option(
        "picture",
        "picture: built-in procedurally drawn picture (stand-in for the papers' Hello-Kitty); "
        "noise: uniform random image seeded by attack.seed; file: attack.blended.file",
        choices=("picture", "noise", "file"),
    )
    file: str | None = option(None, "image file used when attack.blended.trigger=file (resized)")


@dataclass(frozen=True)
class WaNetConfig:
    k: int = option(
        4, "control grid size k×k of the warping field (Nguyen & Tran 2021)", check=at_least(2)
    )
    s: float = option(0.5, "warping strength", check=above(0))
    grid_rescale: float = option(1.0, "scale of the warped grid before clipping", check=above(0))
    cross_ratio: float = option(
        2.0,
        "noise-mode ('cross') images per poisoned image: warped with a random extra field, "
        "keeping their true labels",
        check=at_least(0),
    )
    redraw: bool = option(
        False,
        "draw a fresh poisoned and cross set every epoch (the original WaNet poisons per "
        "batch); false keeps the set fixed at build time like every other attack",
    )


@dataclass(frozen=True)
class LCConfig:
    eps: float = option(
        16 / 255,
        "PGD budget of the surrogate's adversarial perturbation (Turner et al. 2019)",
        unit="pixel units",
        check=above(0),
    )
    norm: str = option("linf", "norm of the adversarial perturbation", choices=("linf", "l2"))
    steps: int = option(10, "PGD steps of the perturbation", check=at_least(1))
    amplitude: float = option(
        1.0,
        "trigger amplitude on poisoned training images: pixels move by ±amplitude toward "
        "white/black (1 = full replacement; Turner et al. also use 16/255-64/255)",
        unit="pixel units",
        check=within(0, 1),
    )
    amplitude_test: float = option(
        1.0, "trigger amplitude on test images", unit="pixel units", check=within(0, 1)
    )
    surrogate_epochs: int = option(
        10, "epochs of the surrogate model the platform trains itself", check=at_least(1)
    )
    surrogate_at: str = option(
        "linf",
        "surrogate training: linf = adversarially trained at attack.lc.eps/2 (Turner et al. "
        "perturb with robust models), none = standard training",
        choices=("linf", "none"),
    )


@dataclass(frozen=True)
class WatermarkConfig:
    amplitude: float = option(
        32 / 255,
        "peak additive change of the watermark (clipped to [0, 1])",
        unit="pixel units",
        check=within(0, 1),
    )


@dataclass(frozen=True)
class AttackConfig:
    name: str = option(
        "badnets",
        "backdoor attack used to poison the training set",
        choices=_registry_names("bdat_ray.backdoors", "BACKDOORS"),
    )
    poison_rate: float = option(
        0.05,
        "poisoned images as a fraction of the WHOLE training set, for badnets, blended, wanet, "
        "lc (CAT paper: 0.01 dirty-label BadNets and LC, 0.005 clean-label, 0.05 Blended/WaNet)",
        unit="fraction",
        check=within(0, 1),
    )
    target_fraction: float = option(
        0.5,
        "poisoned images as a fraction of the TARGET CLASS, for Weng et al.'s clean-label "
        "sticker, watermark and channel triggers (their Table 7: 0.5, 0.25, 0.1)",
        unit="fraction",
        check=within(0, 1),
    )
    target: int = option(2, "target class (CAT paper: 2)", check=at_least(0))
    label_mode: str | None = option(
        None,
        "dirty: poisoned images are relabelled to the target; clean: only target-class images "
        "are poisoned and labels never change; default: the attack's own (clean for lc and "
        "Weng's sticker/watermark/channel, dirty for the others)",
        choices=("dirty", "clean"),
    )
    trigger: str = option(
        "checkerboard3",
        "patch pattern (badnets)",
        choices=_registry_names("bdat_ray.backdoors.triggers", "PATTERNS"),
    )
    trigger_size: int | None = option(
        None,
        "patch side length (badnets, sticker, channel); default: the pattern's own (3 or 2)",
        unit="px",
        check=above(0),
    )
    position: str = option(
        "bottom_right",
        "patch corner; random_corner draws a corner per image (Weng et al. Table 8)",
        choices=("bottom_right", "bottom_left", "top_right", "top_left", "random_corner"),
    )
    seed: int = option(0, "seed of the poisoned-index draw and of random triggers")
    blended: BlendedConfig = field(default_factory=BlendedConfig)
    wanet: WaNetConfig = field(default_factory=WaNetConfig)
    lc: LCConfig = field(default_factory=LCConfig)
    watermark: WatermarkConfig = field(default_factory=WatermarkConfig)


def _threat_section(name: str, budget: str, paper_default: str, extra: str = "") -> type:
    """The per-threat section ``at.<name>.*``: budget, steps, step size and composite weight."""

    @dataclass(frozen=True)
    class Section:
        eps: float | None = option(
            None,
            f"{name} budget [{budget}] when used as a component of at.threat=composite (or as the "
            f"single threat when at.eps is unset); default {paper_default}{extra}",
            check=above(0),
        )
        steps: int | None = option(
            None, f"{name} attack steps; default at.steps", check=at_least(1)
        )
        step_size: float | None = option(
            None, f"{name} step size; default the threat's rule", check=above(0)
        )
        weight: float | None = option(
            None,
            f"{name} weight in a composite (normalised to sum 1; unset weights share what the "
            "set ones leave, so one float sweeps a two-way mix)",
            check=at_least(0),
        )

    Section.__name__ = Section.__qualname__ = f"{name.title().replace('_', '')}Section"
    return Section


LinfSection = _threat_section("linf", "pixel units, L-inf", "8/255", " (CAT uses 2/255)")
L2Section = _threat_section("l2", "pixel units, L2", "128/255")
NoiseSection = _threat_section("noise", "pixel units, Gaussian σ", "0.1")
FlowNoiseSection = _threat_section("flow_noise", "normalised grid units, L-inf", "0.025")


@dataclass(frozen=True)
class SpatialSection(
    _threat_section("spatial", "normalised grid units, L-inf", "0.025 (CAT paper)")
):
    tau: float = option(
        0.0,
        "weight of stAdv's flow-smoothness penalty subtracted from the inner objective",
        check=at_least(0),
    )
    optimizer: str = option(
        "sign", "flow update: gradient sign or Adam steps", choices=("sign", "adam")
    )


@dataclass(frozen=True)
class PerceptualSection(_threat_section("perceptual", "LPIPS distance", "0.5")):
    network: str = option(
        "self",
        "feature network of the LPIPS distance: self = the model being trained (self-bounded, "
        "CAT paper; runs offline); alex/vgg = lpips' LPIPS nets, needing torchvision's "
        "ImageNet weights already in the torch hub cache",
        choices=("self", "alex", "vgg"),
    )
    lagrange: float = option(
        10.0,
        "Lagrange multiplier λ of Fast-LPA's penalty λ·ReLU(d − ε) at the last step "
        "(Laidlaw et al. 2021)",
        check=above(0),
    )
    lagrange_growth: float = option(
        10.0,
        "λ rises by this factor over the attack's steps (starts at lagrange/growth)",
        check=at_least(1),
    )
    projection_steps: int = option(
        10, "bisection steps that pull an out-of-bound result back inside", check=at_least(0)
    )


THREAT_NAMES = ("linf", "l2", "spatial", "perceptual", "noise", "flow_noise")


@dataclass(frozen=True)
class ATConfig:
    threat: str = option(
        "none",
        "threat model of adversarial training: none = standard training; composite = "
        "at.components mixed by at.mix; cat = the CAT paper's L-inf 2/255 + spatial 0.025",
        choices=("none", *THREAT_NAMES, "composite", "cat"),
    )
    eps: float | None = option(
        None,
        "budget of a single at.threat in its own unit (linf/l2/noise: pixel units, e.g. 8/255; "
        "spatial/flow_noise: normalised grid units; perceptual: LPIPS distance); default: "
        "at.<threat>.eps, else the threat's paper default",
        check=at_least(0),
    )
    steps: int = option(5, "attack steps per training batch", check=at_least(1))
    step_size: float | None = option(
        None, "attack step size; default 2.5*eps/steps (Madry et al. 2018)", check=above(0)
    )
    random_start: bool = option(True, "start from a random point of the threat model")
    bn_mode: str = option(
        "eval",
        "BatchNorm mode while the attack runs: eval uses (and never updates) running statistics; "
        "train uses batch statistics and updates the running ones",
        choices=("eval", "train"),
    )
    components: str = option(
        "linf,spatial",
        "comma-separated threat models mixed by at.threat=composite, each with its budget in "
        "at.<threat>.eps",
    )
    mix: str = option(
        "sum",
        "composite rule: sum = weighted sum of losses; random = one threat per batch drawn by "
        "weight; max = per sample the threat with the highest loss",
        choices=("sum", "random", "max"),
    )
    linf: LinfSection = field(default_factory=LinfSection)
    l2: L2Section = field(default_factory=L2Section)
    spatial: SpatialSection = field(default_factory=SpatialSection)
    perceptual: PerceptualSection = field(default_factory=PerceptualSection)
    noise: NoiseSection = field(default_factory=NoiseSection)
    flow_noise: FlowNoiseSection = field(default_factory=FlowNoiseSection)


@dataclass(frozen=True)
class EvalConfig:
    threat: str = option(
        "linf",
        "threat model of the fixed evaluation attack behind robust_acc",
        choices=_registry_names("bdat_ray.threats", "THREATS"),
    )
    eps: float = option(8 / 255, "evaluation attack budget", check=above(0))
    steps: int = option(20, "evaluation attack steps (PGD-20)", check=at_least(1))
    step_size: float = option(2 / 255, "evaluation attack step size", check=above(0))
    robust_samples: int = option(
        1000,
        "first N clean test images attacked for robust_acc (0 = skip robust_acc)",
        unit="images",
        check=at_least(0),
    )
    batch_size: int = option(512, "evaluation batch size", unit="images", check=at_least(1))


@dataclass(frozen=True)
class Config:
    device: str = option(
        "auto",
        "auto | cpu | cuda | cuda:N (auto = cuda when available)",
        check=lambda v: (
            None
            if re.fullmatch(r"auto|cpu|cuda(:\d+)?", v)
            else "must be auto, cpu, cuda or cuda:N"
        ),
    )
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    at: ATConfig = field(default_factory=ATConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    # -- conversions -------------------------------------------------------------------------

    def to_flat(self) -> dict[str, Any]:
        """``{"data.name": "digits", ...}`` in declaration order."""
        return {key: _get(self, key) for key in leaf_keys()}

    def replace(self, overrides: Mapping[str, Any]) -> Config:
        """A validated copy with some flat keys overridden: ``cfg.replace({"at.eps": 0.1})``."""
        return from_flat({**self.to_flat(), **overrides})

    def hash(self) -> str:
        """Short stable hash of the resolved flat config (tags runs, caches surrogates)."""
        text = json.dumps(self.to_flat(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Schema introspection.


@dataclass(frozen=True)
class Leaf:
    key: str
    type: Any
    default: Any
    help: str
    unit: str
    choices: Iterable[str] | Callable[[], Iterable[str]] | None
    check: Check | None

    def allowed_choices(self) -> list[str] | None:
        if self.choices is None:
            return None
        return list(self.choices() if callable(self.choices) else self.choices)


def _leaves(cls: type, prefix: str = "") -> list[Leaf]:
    hints = typing.get_type_hints(cls)
    out: list[Leaf] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(_leaves(tp, f"{prefix}{f.name}."))
            continue
        meta = f.metadata
        out.append(
            Leaf(
                f"{prefix}{f.name}",
                tp,
                f.default,
                meta.get("help", ""),
                meta.get("unit", ""),
                meta.get("choices"),
                meta.get("check"),
            )
        )
    return out


_LEAVES: dict[str, Leaf] = {leaf.key: leaf for leaf in _leaves(Config)}


def leaf_keys() -> list[str]:
    return list(_LEAVES)


def leaf(key: str) -> Leaf:
    if key not in _LEAVES:
        close = difflib.get_close_matches(key, _LEAVES, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see --help for all keys"
        raise ConfigError(key, f"unknown key{hint}")
    return _LEAVES[key]


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


# ---------------------------------------------------------------------------------------------
# Value parsing: strings and YAML scalars -> typed values. Never eval.

_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_FRACTION = re.compile(rf"^\s*({_NUMBER})\s*/\s*({_NUMBER})\s*$")
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _describe_type(tp: Any) -> str:
    base = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    names = {int: "an integer", float: "a number (fractions like 8/255 allowed)", bool: "a bool"}
    text = names.get(base[0], "a string")
    return text + (" or none" if _is_optional(tp) else "")


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(
        None
    ) in typing.get_args(tp)


def parse_value(key: str, raw: Any) -> Any:
    """Convert ``raw`` (str or YAML scalar) to the type of ``key`` and check it."""
    spec = leaf(key)
    tp = spec.type
    optional = _is_optional(tp)
    base = next(a for a in typing.get_args(tp) if a is not type(None)) if optional else tp
    value: Any
    spelled_null = isinstance(raw, str) and raw.strip().lower() in {"none", "null"}
    if raw is None or (optional and spelled_null):
        if not optional:
            raise ConfigError(key, f"must be {_describe_type(tp)}; got none")
        return None
    try:
        value = _coerce(base, raw)
    except (TypeError, ValueError):
        raise ConfigError(key, f"must be {_describe_type(tp)}; got {raw!r}") from None
    choices = spec.allowed_choices()
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(key, f"must be one of {', '.join(choices)}; got {value!r}{hint}")
    if spec.check is not None and (problem := spec.check(value)):
        unit = f" ({spec.unit})" if spec.unit else ""
        raise ConfigError(key, f"{problem}{unit}; got {raw!r}")
    return value


def _coerce(base: type, raw: Any) -> Any:
    if base is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise ValueError(raw)
    if base is int:
        if isinstance(raw, bool):
            raise TypeError(raw)
        if isinstance(raw, float):
            if not raw.is_integer():
                raise ValueError(raw)
            return int(raw)
        return int(str(raw).strip())
    if base is float:
        if isinstance(raw, bool):
            raise TypeError(raw)
        if isinstance(raw, int | float):
            return float(raw)
        text = str(raw).strip()
        if match := _FRACTION.match(text):
            numerator, denominator = float(match[1]), float(match[2])
            if denominator == 0:
                raise ValueError(raw)
            return numerator / denominator
        if re.fullmatch(_NUMBER, text):
            return float(text)
        raise ValueError(raw)
    if isinstance(raw, bool | int | float):
        raise TypeError(raw)
    return str(raw).strip()


# ---------------------------------------------------------------------------------------------
# Building configs.


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested YAML mappings -> flat dotted keys (flat keys pass through)."""
    flat: dict[str, Any] = {}
    for name, value in mapping.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{key}."))
        else:
            flat[key] = value
    return flat


def from_flat(values: Mapping[str, Any]) -> Config:
    """Build and validate a `Config` from flat dotted keys; missing keys take defaults."""
    nested: dict[str, Any] = {}
    for key, raw in values.items():
        *sections, name = key.split(".")
        node = nested
        for part in sections:
            node = node.setdefault(part, {})
        node[name] = parse_value(key, raw)
    cfg = _instantiate(Config, nested)
    validate(cfg)
    return cfg


def _instantiate(cls: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    return cls(
        **{
            name: _instantiate(hints[name], value) if isinstance(value, dict) else value
            for name, value in values.items()
        }
    )


def parse_overrides(pairs: Iterable[str]) -> dict[str, str]:
    """``["at.eps=8/255", ...]`` -> ``{"at.eps": "8/255"}``; a malformed pair is a ConfigError."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(pair, "overrides are KEY=VALUE, e.g. at.eps=8/255")
        out[key.strip()] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError("--config", f"no such file: {file}")
    try:
        content = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError("--config", f"{file} is not valid YAML: {err}".splitlines()[0]) from None
    if not isinstance(content, Mapping):
        raise ConfigError("--config", f"{file} must hold a mapping of keys to values")
    return flatten(content)


def build_config(config_file: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults <- YAML file <- ``KEY=VALUE`` overrides, validated."""
    values: dict[str, Any] = load_yaml(config_file) if config_file else {}
    values.update(parse_overrides(overrides))
    return from_flat(values)


# The CAT paper's composite (§4): L-inf 2/255 + spatial 0.025, equally weighted.
CAT_PRESET = {"linf": 2 / 255, "spatial": 0.025}


@dataclass(frozen=True)
class Component:
    """One threat model of an AT run with everything resolved but the class defaults."""

    threat: str
    eps: float | None  # None: the threat's paper default
    steps: int
    step_size: float | None
    weight: float


def at_components(at: ATConfig) -> list[Component]:
    """The threat models an ``at`` section trains against (empty for standard training).

    Single threat: budget ``at.eps``, else ``at.<threat>.eps``, else the paper default.
    ``composite``: ``at.components``, each with its required ``at.<threat>.eps``.
    ``cat``: L-inf 2/255 + spatial 0.025 unless ``at.linf.eps``/``at.spatial.eps`` say
    otherwise. Weights: ``at.<threat>.weight``; unset ones share what the set ones leave.
    Raises `ConfigError` naming the key for anything that cannot run."""
    if at.threat == "none":
        return []
    if at.threat not in ("composite", "cat"):
        section = getattr(at, at.threat)
        if at.eps == 0:
            raise ConfigError("at.eps", f"must be > 0 for at.threat={at.threat}; got 0")
        eps = at.eps if at.eps is not None else section.eps
        return [
            Component(
                at.threat, eps, section.steps or at.steps, at.step_size or section.step_size, 1.0
            )
        ]
    if at.eps is not None:
        raise ConfigError(
            "at.eps",
            f"applies to a single threat; at.threat={at.threat} takes at.<threat>.eps "
            "per component",
        )
    if at.threat == "cat":
        names = list(CAT_PRESET)
    else:
        names = [n.strip() for n in at.components.split(",") if n.strip()]
        unknown = [n for n in names if n not in THREAT_NAMES]
        if unknown or len(names) < 2 or len(set(names)) != len(names):
            raise ConfigError(
                "at.components",
                f"must name two or more distinct threat models of {', '.join(THREAT_NAMES)}; "
                f"got {at.components!r}",
            )
    sections = {n: getattr(at, n) for n in names}
    budgets = {
        n: sec.eps if sec.eps is not None else CAT_PRESET.get(n) for n, sec in sections.items()
    }
    if at.threat == "composite":
        for n, sec in sections.items():
            if sec.eps is None:
                raise ConfigError(
                    f"at.{n}.eps", f"composite component {n} needs its budget (at.{n}.eps=...)"
                )
    weights = {n: sec.weight for n, sec in sections.items()}
    given = sum(w for w in weights.values() if w is not None)
    unset = [n for n, w in weights.items() if w is None]
    for n in unset:
        weights[n] = max(0.0, 1.0 - given) / len(unset) if given else 1.0 / len(names)
    if sum(weights.values()) <= 0:
        raise ConfigError(
            f"at.{names[0]}.weight", "composite weights must sum to a positive number"
        )
    return [
        Component(n, budgets[n], sec.steps or at.steps, sec.step_size, weights[n])
        for n, sec in sections.items()
    ]


def validate(cfg: Config) -> None:
    """Cross-key checks that need no dataset (dataset-dependent ones run in `engine.prepare`)."""
    at_components(cfg.at)
    from bdat_ray.backdoors import BACKDOORS

    BACKDOORS[cfg.attack.name].check_config(cfg.attack)


def describe_keys() -> str:
    """The --help listing: every key with its default, unit, choices and meaning."""
    lines = []
    for spec in _LEAVES.values():
        default = "none" if spec.default is None else spec.default
        if isinstance(default, float):
            default = f"{default:.6g}"
        unit = f" [{spec.unit}]" if spec.unit else ""
        choices = spec.allowed_choices()
        allowed = f" {{{' | '.join(choices)}}}" if choices else ""
        lines.append(f"  {spec.key}={default}{unit}{allowed}\n      {spec.help}")
    return "\n".join(lines)
