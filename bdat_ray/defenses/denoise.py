"""Feature-denoising layers (Xie et al., CVPR 2019), Weng et al. Table 1.

After every stage of the network a residual denoising block y = x + BN(conv1×1(D(x))) is
inserted (Xie et al. Fig. 4). Weng et al.'s code (``cifar10/classifier_cifar10_denoising.py``
of nthu-datalab/On.the.Trade-off.between.Adversarial.and.Backdoor.Robustness) places one after
each of ResNet-32's three stages with D the embedded-Gaussian non-local mean with softmax
(``filter=nonlocal``, the default). Xie et al. §5 also compare local filters, provided here
by kornia: ``gaussian`` (σ 1), ``median`` and ``box`` (mean), 3×3. The block's BatchNorm scale
starts at zero so every block begins as the identity (Xie et al. initialise it so). A model
change, so it composes with AT ("Denoising Layer + Adv. Training").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bdat_ray.defenses.base import Defense
from bdat_ray.options import option


@dataclass(frozen=True)
class DenoiseSection:
    filter: str = option(
        "nonlocal",
        "denoising operation D: nonlocal (embedded Gaussian, softmax; Weng et al.'s code), or "
        "kornia's 3×3 gaussian (σ 1), median, box (mean) filters (Xie et al. §5)",
        choices=("nonlocal", "gaussian", "median", "box"),
    )


class NonLocalMeans(nn.Module):
    """y_i = Σ_j softmax_j(θ(x_i)·φ(x_j)) x_j with 1×1 embeddings θ, φ to C/2 channels."""

    def __init__(self, channels: int):
        super().__init__()
        inner = max(1, channels // 2)
        self.theta = nn.Conv2d(channels, inner, 1, bias=False)
        self.phi = nn.Conv2d(channels, inner, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        q = self.theta(x).flatten(2)  # (N, C', HW)
        k = self.phi(x).flatten(2)
        weights = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # (N, HW, HW)
        return (x.flatten(2) @ weights.transpose(1, 2)).view(n, c, h, w)


class LocalFilter(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import kornia.filters as kf

        if self.kind == "gaussian":
            return kf.gaussian_blur2d(x, (3, 3), (1.0, 1.0))
        if self.kind == "median":
            return kf.median_blur(x, (3, 3))
        return kf.box_blur(x, (3, 3))


class DenoisingBlock(nn.Module):
    def __init__(self, channels: int, kind: str):
        super().__init__()
        self.denoise = NonLocalMeans(channels) if kind == "nonlocal" else LocalFilter(kind)
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.norm = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.norm.weight)  # the block starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.conv(self.denoise(x)))


class Denoise(Defense):
    name = "denoise"
    stage = "train"
    section = DenoiseSection
    paper = "Xie et al. 2019; Weng et al. Table 1 (alone and + AT)"

    def adapt_model(self, model: nn.Module) -> nn.Module:
        with torch.no_grad():
            probe = torch.zeros(1, *self.ctx.image_shape)
            channels = [f.shape[1] for f in model.eval().features(probe)]
        model.train()
        for i, c in enumerate(channels):
            model.stages[i] = nn.Sequential(model.stages[i], DenoisingBlock(c, self.cfg.filter))
        return model
