"""Horizontal fusion (HFTA, Wang et al., MLSys 2021): K same-shaped models trained as one.

`fuse` turns K networks of one architecture into a single network whose layers hold all K
members side by side, member-major along the channel axis:

- ``Conv2d(cin, cout, groups=g)`` -> ``Conv2d(K·cin, K·cout, groups=K·g)``: member k's
  output channels see only member k's input channels;
- ``BatchNorm2d(C)`` -> ``BatchNorm2d(K·C)``: statistics are per channel, so per member —
  each member keeps its own running statistics (what ``torch.func.stack_module_state`` +
  ``vmap`` cannot do);
- ``GroupNorm(G, C)`` -> ``GroupNorm(K·G, K·C)``: groups are contiguous channel blocks;
- ``Linear(i, o)`` -> `FusedLinear` (a batched matrix product over the K members);
- the models' input `Normalize` -> per-member mean/std buffers side by side;
- ops that mix channels without weights (`models.common.MemberAware`: per-image
  standardisation, channel zero-padding) are told how many members they hold;
- parameter-free layers (ReLU, pooling, Identity, ...) are channel-wise and kept as they are.

`FusedModel` takes and returns the *stacked* layout the engine, the attacks and the losses
work on: ``(K·B, C, H, W)`` images, member k's batch in rows ``k·B:(k+1)·B``, and
``(K·B, classes)`` logits. Inside, a batch becomes ``(B, K·C, H, W)``. Because every fused
parameter has the member index as its leading block, ``param.view(K, -1)[k]`` is member k's
share — `unfuse` reads the K models back, `member_slices` gives per-member optimiser views.

A model is fusable when its forward pass mixes channels only through these layers (checked
by `check_fusable`, and over the whole model registry by the tests): an op such as a
per-image standardisation over all channels would mix members and is refused.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from bdat_ray.models.common import MemberAware, Normalize

#: Layers that act on each channel (or each position) alone: fusion keeps them unchanged.
CHANNELWISE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Identity,
    nn.Dropout,
    nn.Flatten,
)


class FusedLinear(nn.Module):
    """K linear layers as one batched matrix product: ``(B, K·i) -> (B, K·o)``."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.members = len(layers)
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]))  # K,o,i
        self.bias = (
            nn.Parameter(torch.stack([m.bias.detach() for m in layers]))
            if layers[0].bias is not None
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, out_features, in_features = self.weight.shape
        per_member = x.reshape(x.shape[0], k, in_features).transpose(0, 1)  # K, B, i
        y = torch.bmm(per_member, self.weight.transpose(1, 2))  # K, B, o
        if self.bias is not None:
            y = y + self.bias[:, None, :]
        return y.transpose(0, 1).reshape(x.shape[0], k * out_features)

    def member(self, k: int) -> nn.Linear:
        _, out_features, in_features = self.weight.shape
        layer = nn.Linear(in_features, out_features, bias=self.bias is not None)
        layer.weight.data.copy_(self.weight.data[k])
        if self.bias is not None:
            layer.bias.data.copy_(self.bias.data[k])
        return layer


def _cat(tensors: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return torch.cat([t.detach() for t in tensors], dim=dim)


def _fuse_conv(layers: list[nn.Conv2d]) -> nn.Conv2d:
    first, k = layers[0], len(layers)
    fused = nn.Conv2d(
        k * first.in_channels,
        k * first.out_channels,
        first.kernel_size,
        first.stride,
        first.padding,
        first.dilation,
        k * first.groups,
        first.bias is not None,
        first.padding_mode,
    )
    fused.weight.data.copy_(_cat([m.weight for m in layers]))
    if first.bias is not None:
        fused.bias.data.copy_(_cat([m.bias for m in layers]))
    return fused


def _fuse_batchnorm(layers: list[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    first, k = layers[0], len(layers)
    fused = nn.BatchNorm2d(
        k * first.num_features, first.eps, first.momentum, first.affine, first.track_running_stats
    )
    if first.affine:
        fused.weight.data.copy_(_cat([m.weight for m in layers]))
        fused.bias.data.copy_(_cat([m.bias for m in layers]))
    if first.track_running_stats:
        fused.running_mean.copy_(_cat([m.running_mean for m in layers]))
        fused.running_var.copy_(_cat([m.running_var for m in layers]))
        # One counter for all: members are fused from the same step on and stay in lockstep.
        fused.num_batches_tracked.copy_(first.num_batches_tracked)
    return fused


def _fuse_groupnorm(layers: list[nn.GroupNorm]) -> nn.GroupNorm:
    first, k = layers[0], len(layers)
    fused = nn.GroupNorm(k * first.num_groups, k * first.num_channels, first.eps, first.affine)
    if first.affine:
        fused.weight.data.copy_(_cat([m.weight for m in layers]))
        fused.bias.data.copy_(_cat([m.bias for m in layers]))
    return fused


def _fuse_normalize(layers: list[Normalize]) -> Normalize:
    mean = _cat([m.mean for m in layers], dim=1).flatten().tolist()
    std = _cat([m.std for m in layers], dim=1).flatten().tolist()
    return Normalize(mean, std)


FUSERS = {
    nn.Conv2d: _fuse_conv,
    nn.BatchNorm2d: _fuse_batchnorm,
    nn.GroupNorm: _fuse_groupnorm,
    nn.Linear: FusedLinear,
    Normalize: _fuse_normalize,
}


def check_fusable(model: nn.Module) -> None:
    """Raise ValueError naming the first layer fusion cannot split by member."""
    for name, module in model.named_modules():
        if type(module) in FUSERS or isinstance(module, (*CHANNELWISE, MemberAware)):
            continue
        own_params = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if own_params:
            raise ValueError(f"layer {name} ({type(module).__name__}) cannot be fused")


def _fuse_tree(members: list[nn.Module]) -> nn.Module:
    kind = type(members[0])
    if kind in FUSERS:
        return FUSERS[kind](members)
    fused = copy.copy(members[0])  # same class and plain attributes; own state made afresh
    if isinstance(fused, MemberAware):
        fused.members = len(members) * members[0].members
    fused._parameters, fused._buffers = OrderedDict(), OrderedDict()  # empty: check_fusable
    fused._modules = OrderedDict(
        (name, _fuse_tree([m._modules[name] for m in members]) if child is not None else None)
        for name, child in members[0]._modules.items()
    )
    return fused


def fuse(models: list[nn.Module]) -> FusedModel:
    """One network training the K ``models`` (same architecture) side by side."""
    shapes = {tuple((n, tuple(p.shape)) for n, p in m.state_dict().items()) for m in models}
    if len(shapes) != 1:
        raise ValueError("fused members must share one architecture (the same state shapes)")
    for m in models:
        check_fusable(m)
    return FusedModel(_fuse_tree(list(models)), len(models))


class FusedModel(nn.Module):
    """K members behind the stacked ``(K·B, ...)`` layout (see the module docstring)."""

    def __init__(self, net: nn.Module, members: int):
        super().__init__()
        self.net = net
        self.members = members

    def _to_channels(self, x: torch.Tensor) -> torch.Tensor:
        k = self.members
        kb, c, h, w = x.shape
        b = kb // k
        return x.reshape(k, b, c, h, w).transpose(0, 1).reshape(b, k * c, h, w)

    def _to_stacked(self, y: torch.Tensor) -> torch.Tensor:
        k = self.members
        b, kc = y.shape[:2]
        rest = y.shape[2:]
        return y.reshape(b, k, kc // k, *rest).transpose(0, 1).reshape(k * b, kc // k, *rest)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._to_stacked(self.net(self._to_channels(x)))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self._to_stacked(s) for s in self.net.features(self._to_channels(x))]

    def head(self, last: torch.Tensor) -> torch.Tensor:
        return self._to_stacked(self.net.head(self._to_channels(last)))


def unfuse(fused: FusedModel, template: nn.Module) -> list[nn.Module]:
    """The K members as standalone copies of ``template``'s architecture (CPU-independent:
    they live where the fused model lives)."""
    members = []
    for k in range(fused.members):
        model = copy.deepcopy(template)
        copy_member(fused, model, k)
        members.append(model.to(next(fused.parameters()).device))
    return members


def copy_member(fused: FusedModel, target: nn.Module, k: int) -> None:
    """Write member ``k``'s weights and statistics into ``target`` (its architecture)."""
    _copy_member(fused.net, target, k, fused.members)


def _copy_member(fused: nn.Module, target: nn.Module, k: int, n: int) -> None:
    if isinstance(fused, FusedLinear):
        raise TypeError("a FusedLinear is copied by its parent")
    for name, child in fused._modules.items():
        if child is None:
            continue
        if isinstance(child, FusedLinear):
            target._modules[name] = child.member(k).to(child.weight.device)
        else:
            _copy_member(child, target._modules[name], k, n)
    own = dict(fused.named_parameters(recurse=False)) | dict(fused.named_buffers(recurse=False))
    for name, tensor in own.items():
        mine = getattr(target, name)
        if name == "num_batches_tracked":
            mine.copy_(tensor)
        elif isinstance(fused, Normalize):
            mine.copy_(tensor.reshape(1, n, -1, 1, 1)[:, k])
        else:
            mine.data.copy_(tensor.detach().reshape(n, *mine.shape)[k])


def member_view(tensor: torch.Tensor, members: int) -> torch.Tensor:
    """``tensor`` (a fused parameter, its gradient or optimiser state) as ``(K, ...)``, a view:
    only the leading axis is split, so channels_last weights (whose other axes are not
    contiguous in logical order) split as well as contiguous ones."""
    return tensor.view(members, tensor.shape[0] // members, *tensor.shape[1:])


def members_loss(logits: torch.Tensor, y: torch.Tensor, members: int) -> torch.Tensor:
    """Σ_k mean_b CE: member k's parameters get exactly the gradient of its own mean loss."""
    per_sample = F.cross_entropy(logits.float(), y, reduction="none")
    return per_sample.view(members, -1).mean(1).sum()
