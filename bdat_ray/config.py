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
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bdat_ray.backdoors import BACKDOORS
from bdat_ray.defenses import DEFENSES
from bdat_ray.options import (
    Check,
    ConfigError,
    above,
    at_least,
    option,
    registry_names,
    within,
)
from bdat_ray.threats import THREATS

# ---------------------------------------------------------------------------------------------
# The schema. Sections are frozen dataclasses; `Config` nests them. Attacks, threat models
# and defenses declare their own sections beside their code (`with_plugin_sections`).

THREAT_NAMES = tuple(THREATS)
#: Seeds are scaled and offset (e.g. ``seed * 1000 + offset`` per generator) and must stay
#: within torch's and numpy's 64-bit seed range: [0, 2^31 - 1] leaves room for that.
SEED_MAX = 2**31 - 1
MAX_WIDTH = 64


@dataclass(frozen=True)
class DataConfig:
    name: str = option(
        "digits",
        "dataset: digits is scikit-learn's bundled 8x8 digits upsampled (no download); npz takes "
        "x_train/y_train/x_test/y_test uint8 arrays; imagefolder takes DIR/train and DIR/test",
        choices=registry_names("bdat_ray.data.sources", "SOURCES"),
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
        choices=registry_names("bdat_ray.models", "MODELS"),
    )
    width: float = option(
        1.0,
        "channel width multiplier (Weng et al. Table 4 doubles it)",
        # Beyond 64x a small CNN alone exhausts memory (and 1e300 overflows the layer sizes).
        check=lambda v: above(0)(v) or (None if v <= MAX_WIDTH else f"must be ≤ {MAX_WIDTH}"),
    )
    norm: str = option(
        "batch", "normalisation layers (group for DPSGD, CAT paper §4)", choices=("batch", "group")
    )


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = option(15, "training epochs (the CAT paper uses 100)", check=at_least(1))
    batch_size: int = option(128, "mini-batch size", unit="images", check=at_least(1))
    lr: float = option(
        0.1, "initial learning rate, divided by 10 at each of train.lr_milestones", check=above(0)
    )
    lr_milestones: str = option(
        "0.6,0.9",
        "comma-separated epochs where lr is divided by 10: fractions in (0, 1) of train.epochs "
        "(CAT paper: 0.6,0.9) or whole epochs (Weng et al.'s reference: 80,120); empty = constant",
        check=lambda v: lr_milestones_problem(v),
    )
    optimizer: str = option(
        "sgd",
        "sgd (momentum, both papers' CIFAR setting) or adam (Weng et al.'s MNIST reference, "
        "lr 1e-4; train.momentum then unused)",
        choices=("sgd", "adam"),
    )
    momentum: float = option(0.9, "SGD momentum", check=within(0, 1))
    weight_decay: float = option(
        5e-4,
        "L2 weight decay added to the gradient (SGD/Adam weight_decay; Weng et al.'s "
        "0.002·Σ l2_loss(W) = 0.002·Σ ½‖W‖² is weight_decay 2e-3)",
        check=at_least(0),
    )
    seed: int = option(
        0, "seed of weights, data order, augmentation and attack starts", check=within(0, SEED_MAX)
    )
    crop_padding: int = option(
        4,
        "zero padding before the random crop (CAT paper / standard CIFAR: 4; Weng et al.'s "
        "reference pads 32->36, i.e. 2)",
        unit="px",
        check=at_least(0),
    )
    augment: str = option(
        "auto",
        "batched on-device augmentation: random crop (pad train.crop_padding) and horizontal "
        "flip; auto = "
        "crop+flip for colour images (CAT paper), none for grey digits (Madry et al.'s MNIST "
        "setting; a crop also pushes small corner triggers out of the image)",
        choices=("auto", "none", "crop", "crop_flip"),
    )
    amp: str = option(
        "auto", "autocast dtype: auto = bf16 on CUDA, off on CPU", choices=("auto", "bf16", "off")
    )
    compile: str = option(
        "auto",
        "torch.compile (inductor, static shapes) of the model's forward/backward in the training "
        "step and the attack steps; evaluation, checkpoints and the logged model stay uncompiled. "
        "auto = off: on the 2-core CPU the compiled PGD-10 AT step is 0.85x as fast after ~26 s "
        "of compiling (BENCHMARKS.md); on CUDA it is unmeasured; on = compile (needs a C++ "
        "compiler on CPU, Triton on CUDA; not with defenses that change the step: abl, dpsgd, "
        "lipschitz)",
        choices=("auto", "on", "off"),
    )


@dataclass(frozen=True)
class AttackKeys:
    """The keys every attack shares; each attack adds its own section (`with_plugin_sections`)."""

    name: str = option(
        "badnets",
        "backdoor attack used to poison the training set",
        choices=registry_names("bdat_ray.backdoors", "BACKDOORS"),
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
        choices=registry_names("bdat_ray.backdoors.triggers", "PATTERNS"),
    )
    trigger_size: int | None = option(
        None,
        "patch side length (badnets, sticker, channel); default: the pattern's own (3 or 2)",
        unit="px",
        check=above(0),
    )
    position: str = option(
        "bottom_right",
        "patch corner; random_corner draws a corner per image for train and test; "
        "quarter_corners puts a quarter of the training poisons at each corner and tests at "
        "the bottom-right (Weng et al. Table 8, their reference code)",
        choices=(
            "bottom_right",
            "bottom_left",
            "top_right",
            "top_left",
            "random_corner",
            "quarter_corners",
        ),
    )
    trigger_offset: int = option(
        0,
        "distance of the patch from the image border (badnets, sticker, channel at a corner; "
        "Weng et al.'s CIFAR reference: 2, i.e. pixels 27:30 on 32×32; their MNIST one: 0)",
        unit="px",
        check=at_least(0),
    )
    seed: int = option(
        0, "seed of the poisoned-index draw and of random triggers", check=within(0, SEED_MAX)
    )


@dataclass(frozen=True)
class ATKeys:
    """The keys of adversarial training; each threat model adds its section ``at.<name>``."""

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
        "train uses batch statistics and updates the running ones; batch uses batch statistics "
        "and leaves the running ones alone (Weng et al.'s reference)",
        choices=("eval", "train", "batch"),
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


@dataclass(frozen=True)
class DefenseKeys:
    """The defense of the run; each defense adds its section ``defense.<name>``."""

    name: str = option(
        "none",
        "baseline defense: filter the poisoned training set, change training, or repair the "
        "trained model (see bdat_ray/defenses); composes with at.* where the papers do",
        choices=registry_names("bdat_ray.defenses", "DEFENSES"),
    )


def lr_milestones_problem(text: str) -> str | None:
    """Why ``train.lr_milestones`` cannot be read, or None."""
    try:
        parse_lr_milestones(text)
    except ValueError:
        return "must be comma-separated fractions in (0, 1) or whole epochs ≥ 1, e.g. 0.6,0.9"
    return None


def parse_lr_milestones(text: str) -> list[float]:
    values = [float(part) for part in text.split(",") if part.strip()]
    if any(v <= 0 or (v >= 1 and not v.is_integer()) for v in values):
        raise ValueError(text)
    return values


def with_plugin_sections(keys: type, registry: Mapping[str, type], name: str) -> type:
    """A frozen section class: ``keys``' fields plus one nested section per registered plugin
    that declares one (its ``section``), named after the plugin — so a plugin's knobs live
    beside its code and adding one touches its module and its registry line only."""
    sections = [
        (plugin, cls.section, field(default_factory=cls.section))
        for plugin, cls in registry.items()
        if getattr(cls, "section", None) is not None
    ]
    section = dataclasses.make_dataclass(name, sections, bases=(keys,), frozen=True)
    section.__module__ = __name__  # pickled by name, like a class written here
    section.__doc__ = keys.__doc__
    return section


AttackConfig = with_plugin_sections(AttackKeys, BACKDOORS, "AttackConfig")
ATConfig = with_plugin_sections(ATKeys, THREATS, "ATConfig")
DefenseConfig = with_plugin_sections(DefenseKeys, DEFENSES, "DefenseConfig")


@dataclass(frozen=True)
class EvalConfig:
    threat: str = option(
        "linf",
        "threat model of the fixed evaluation attack behind robust_acc",
        choices=registry_names("bdat_ray.threats", "THREATS"),
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
    defense: DefenseConfig = field(default_factory=DefenseConfig)
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
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(key, f"must be {_describe_type(tp)}; got {raw!r}") from None
    if problem := _representable(value):
        raise ConfigError(key, f"{problem}; got {raw!r}")
    choices = spec.allowed_choices()
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(key, f"must be one of {', '.join(choices)}; got {value!r}{hint}")
    if spec.check is not None and (problem := spec.check(value)):
        unit = f" ({spec.unit})" if spec.unit else ""
        raise ConfigError(key, f"{problem}{unit}; got {raw!r}")
    return value


#: Integers travel through torch, numpy and MLflow as signed 64-bit values.
INT64 = (-(2**63), 2**63 - 1)


def _representable(value: Any) -> str | None:
    """Why a parsed number cannot work anywhere downstream: ``inf``/``1e999``/NaN budgets and
    rates, or integers beyond int64 (seeds, sizes), which torch and numpy refuse mid-run."""
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if isinstance(value, int) and not isinstance(value, bool) and not INT64[0] <= value <= INT64[1]:
        return "must fit in a signed 64-bit integer"
    return None


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
        inner = flatten(value, f"{key}.") if isinstance(value, Mapping) else {key: value}
        for twice in inner.keys() & flat.keys():  # ``at: {eps: 1}`` beside ``at.eps: 2``
            raise ConfigError(twice, "is given twice (nested and as a dotted key); keep one")
        flat.update(inner)
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
    from bdat_ray.safe_yaml import read_yaml

    file = Path(path)
    content = read_yaml(file, "--config") or {}
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
    BACKDOORS[cfg.attack.name].check_config(cfg.attack)
    DEFENSES[cfg.defense.name].check_config(cfg)


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
