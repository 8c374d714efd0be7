"""Backdoor attacks, registered by name: ``BACKDOORS[name](attack_cfg, context).poison(data)``.

| name | paper | label | poison count |
|---|---|---|---|
| none | clean data (ASR measured with a 3×3 checkerboard) | — | 0 |
| badnets | Gu et al. 2017 | dirty or clean | ``poison_rate`` × training set |
| blended | Chen et al. 2017 | dirty | ``poison_rate`` × training set |
| wanet | Nguyen & Tran 2021 | dirty (+ noise mode) | ``poison_rate`` × training set |
| lc | Turner et al. 2019 | clean | ``poison_rate`` × training set |
| sticker, watermark, channel | Weng et al. 2020 | clean | ``target_fraction`` × target class |
| adaptive | CAT paper App. B (Sleeper Agent-style) | clean | ``poison_rate`` × training set |
"""

from __future__ import annotations

from bdat_ray.backdoors.adaptive import AdaptiveAttack
from bdat_ray.backdoors.badnets import BadNets
from bdat_ray.backdoors.base import Backdoor, NoBackdoor, PoisonContext, PoisonedData
from bdat_ray.backdoors.blended import Blended
from bdat_ray.backdoors.lc import LabelConsistent
from bdat_ray.backdoors.wanet import WaNet
from bdat_ray.backdoors.weng import Channel, Sticker, Watermark

BACKDOORS: dict[str, type[Backdoor]] = {
    cls.name: cls
    for cls in (
        NoBackdoor,
        BadNets,
        Blended,
        WaNet,
        LabelConsistent,
        Sticker,
        Watermark,
        Channel,
        AdaptiveAttack,
    )
}

__all__ = ["BACKDOORS", "Backdoor", "PoisonContext", "PoisonedData"]
