"""Networks: MONAI UNet, DynUNet (plain and residual encoder), SegResNet, SwinUNETR and UNETR.

UNet and DynUNet are shaped by the plan's poolings per axis; the others have a fixed
downsampling.  Which patch sides each network takes is plain data in
:func:`pgps_tune.config.patch_multiple`; :func:`network_for` checks every stage of a
schedule against it before a network is built, so a run fails in one line, not at
stage 7.

The paper's first stage is one pooling increment per axis, which leaves a
1x1x1 bottleneck; PyTorch's instance norm refuses a single spatial element in
training.  Normalising one element gives exactly zero (x - mean(x) = 0), so
we swap in :class:`SafeInstanceNorm3d`, which returns that limit (the affine
bias) instead of raising.  That is what the paper's code does by lifting the
check, and it keeps the published stage list trainable unchanged.

UNETR's position embeddings are a learned grid for one input size; a growing
patch needs them at every stage's token grid.  :class:`ProgressiveUNETR` keeps them
at the final patch's grid (so checkpoints, validation and inference see the
trained grid itself) and interpolates them trilinearly to the token grid of each
input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pgps_tune.config import NETWORKS, NO_DOWNSAMPLING, TrainConfig, check_filters, check_network_patches, unet_levels
from pgps_tune.errors import PgpsError
from pgps_tune.schedule import Schedule

__all__ = ["NETWORKS", "ProgressiveUNETR", "SafeInstanceNorm3d", "build_network", "network_for", "place"]

# On the CPU the convolutional networks train and infer faster in the channels-last 3D memory layout
# (NDHWC) once the patch is large enough, and slower below: the default UNet's training step at
# Hippocampus' 40x56x40, batch 2 (and 4), took 15-20% less time, from 24x24x16 up 0-15% less, and at
# 16x16x16 and below 7-20% more (docs/BENCHMARKS.md section 4b).  So the layout follows the patch:
# channels-last from CHANNELS_LAST_MIN_VOXELS voxels per patch.  The transformers keep the default
# layout (not measured).  ``CPU_CHANNELS_LAST = False`` keeps the default layout everywhere.
CPU_CHANNELS_LAST = True
CHANNELS_LAST_NETWORKS = frozenset({"unet", "dynunet", "dynunet_resenc", "segresnet"})
CHANNELS_LAST_MIN_VOXELS = 8192

# bfloat16 autocast of a CPU training step (TrainConfig.cpu_precision "bf16", on CPUs with bf16 in
# hardware): the convolutional networks' forward pass in bf16 for steps of at least
# CPU_BF16_MIN_VOXELS voxels (batch x patch; below that the fixed cost of a step sets its price and
# bf16 does not lower it).  One exception, convolution by convolution (GuardedConv3d): where the
# input or output has at most CPU_BF16_THIN_DEPTH voxels along the first spatial axis, oneDNN's bf16
# weight gradient differed between identical calls and now and then was infinite (torch 2.13, e.g.
# the bottleneck of 16x16x16 patches under pools [3, 3, 3]), so such a convolution computes in fp32.
# Exact resume needs repeatable steps.
CPU_BF16_MIN_VOXELS = 16384
CPU_BF16_THIN_DEPTH = 2


class SafeInstanceNorm3d(nn.InstanceNorm3d):
    """Instance norm that maps a 1x1x1 input to its limit instead of raising.

    Without running statistics it computes the same normalisation as group norm with one group
    per channel, and runs it through ``F.group_norm``: on the CPU its fused kernels cost less
    than instance norm's path through batch norm (0-5% of an iteration at the final patch of
    Hippocampus, docs/BENCHMARKS.md section 4b) when the input is in the default layout; in
    channels-last 3D it is the other way round (instance norm's path 4-10% faster per iteration at
    the large patches), so those inputs take instance norm's path.  ``group_norm_kernel = False``
    restores PyTorch's instance-norm path everywhere (the benchmark compares both).
    """

    group_norm_kernel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2:].numel() > 1:
            if self.group_norm_kernel and x.dim() == 5 and not self.track_running_stats and x.is_contiguous():
                return F.group_norm(x, x.shape[1], self.weight, self.bias, self.eps)
            return super().forward(x)
        out = torch.zeros_like(x)
        if self.affine:
            out = out + self.bias.view(1, -1, 1, 1, 1)
        return out


class _Fp32WhenThin:
    """Mixed into a 3D convolution: under CPU autocast, an input or output of at most
    ``CPU_BF16_THIN_DEPTH`` voxels along the first spatial axis is computed in fp32 (see above)."""

    def forward(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            depth, stride = x.shape[2], self.stride[0]  # type: ignore[attr-defined]
            out = depth * stride if isinstance(self, nn.ConvTranspose3d) else -(-depth // stride)
            if min(depth, out) <= CPU_BF16_THIN_DEPTH:
                with torch.autocast("cpu", enabled=False):
                    return super().forward(x.float(), *args)  # type: ignore[misc]
        return super().forward(x, *args)  # type: ignore[misc]


class GuardedConv3d(_Fp32WhenThin, nn.Conv3d):
    pass


class GuardedConvTranspose3d(_Fp32WhenThin, nn.ConvTranspose3d):
    pass


_SWAPPED_CONVS = {nn.Conv3d: GuardedConv3d, nn.ConvTranspose3d: GuardedConvTranspose3d}


def _guard_convs(module: nn.Module) -> None:
    """Every plain 3D convolution of ``module`` becomes its guarded class (the same module object:
    parameters and state-dict keys stay as they are)."""
    for child in module.modules():
        if type(child) in _SWAPPED_CONVS:
            child.__class__ = _SWAPPED_CONVS[type(child)]


def _swap_instance_norms(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child) is nn.InstanceNorm3d:
            safe = SafeInstanceNorm3d(
                child.num_features, eps=child.eps, momentum=child.momentum,
                affine=child.affine, track_running_stats=child.track_running_stats,
            )
            safe.load_state_dict(child.state_dict())
            setattr(module, name, safe)
        else:
            _swap_instance_norms(child)


def level_strides(pools: Sequence[int]) -> list[tuple[int, int, int]]:
    """Stride per axis at each downsampling level: 2 while the axis still pools."""
    levels = max(pools)
    return [tuple(2 if lvl < p else 1 for p in pools) for lvl in range(levels)]  # type: ignore[misc]


class ProgressiveUNETR(nn.Module):
    """MONAI's UNETR (Hatamizadeh et al.) for any input whose sides are multiples of the token size.

    Built from MONAI's ViT and UNETR blocks.  With ``token_size=16`` it is MONAI's ``UNETR``
    module for module (same names and shapes: its weights load here); a token of ``2**k``
    has ``k`` upsampling levels, the skips reading transformer layers spread evenly
    (3, 6, 9 of 12 for k = 4).  ``final_patch`` fixes the stored position-embedding grid.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        final_patch: Sequence[int],
        token_size: int = 16,
        feature_size: int = 16,
        hidden_size: int = 768,
        num_layers: int = 12,
    ) -> None:
        super().__init__()
        from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
        from monai.networks.nets import ViT

        levels = int(math.log2(token_size))
        if token_size < 2 or 2**levels != token_size:
            raise PgpsError(f"token size {token_size} must be a power of two >= 2")
        heads = max(1, hidden_size // 64)
        if hidden_size % heads:
            raise PgpsError(f"hidden size {hidden_size} must be a multiple of 64 (or below 64)")
        self.token_size, self.levels, self.hidden_size = token_size, levels, hidden_size
        self.token_grid = tuple(p // token_size for p in final_patch)
        self.skip_layers = [round(num_layers * lvl / levels) for lvl in range(1, levels)]  # MONAI: 3, 6, 9
        self.vit = ViT(
            in_channels=in_channels, img_size=tuple(final_patch), patch_size=token_size, hidden_size=hidden_size,
            mlp_dim=4 * hidden_size, num_layers=num_layers, num_heads=heads, proj_type="conv",
            classification=False, spatial_dims=3,
        )
        common = {"spatial_dims": 3, "kernel_size": 3, "norm_name": "instance", "res_block": True}
        self.encoder1 = UnetrBasicBlock(in_channels=in_channels, out_channels=feature_size, stride=1, **common)
        for lvl in range(1, levels):  # skip at 1/2**lvl of the input: upsample the tokens levels-lvl times
            self.add_module(f"encoder{lvl + 1}", UnetrPrUpBlock(
                in_channels=hidden_size, out_channels=feature_size * 2**lvl, num_layer=levels - lvl - 1,
                stride=1, upsample_kernel_size=2, conv_block=True, **common))
        for lvl in reversed(range(levels)):  # decoder{lvl + 2} ends at 1/2**lvl of the input
            self.add_module(f"decoder{lvl + 2}", UnetrUpBlock(
                in_channels=hidden_size if lvl == levels - 1 else feature_size * 2 ** (lvl + 1),
                out_channels=feature_size * 2**lvl, upsample_kernel_size=2, **common))
        self.out = UnetOutBlock(spatial_dims=3, in_channels=feature_size, out_channels=out_channels)

    def position_embeddings_at(self, grid: Sequence[int]) -> torch.Tensor:
        """The stored embeddings [1, tokens, hidden], trilinearly resized to a token ``grid``."""
        pe = self.vit.patch_embedding.position_embeddings
        pe = pe.transpose(1, 2).reshape(1, self.hidden_size, *self.token_grid)
        pe = F.interpolate(pe, size=tuple(grid), mode="trilinear", align_corners=False)
        return pe.flatten(2).transpose(1, 2)

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        embed = self.vit.patch_embedding
        tokens = embed.patch_embeddings(x_in)  # [B, hidden, *grid]
        grid = tokens.shape[2:]
        x = embed.dropout(tokens.flatten(2).transpose(1, 2) + self.position_embeddings_at(grid))
        layers = []
        for block in self.vit.blocks:
            x = block(x)
            layers.append(x)
        x = self.vit.norm(x)

        def volume(t: torch.Tensor) -> torch.Tensor:
            return t.transpose(1, 2).reshape(t.shape[0], self.hidden_size, *grid)

        skips = [self.encoder1(x_in)]
        skips += [getattr(self, f"encoder{lvl + 1}")(volume(layers[i])) for lvl, i in enumerate(self.skip_layers, 1)]
        out = volume(x)
        for lvl in reversed(range(self.levels)):
            out = getattr(self, f"decoder{lvl + 2}")(out, skips[lvl])
        return self.out(out)


def build_network(
    name: str,
    in_channels: int,
    num_classes: int,
    pools: Sequence[int],
    filters: Sequence[int] = (16, 32, 64, 128, 256, 320),
    deep_supervision: bool = False,
    *,
    res_units: int = 1,
    final_patch: Sequence[int] | None = None,
    feature_size: int | None = None,
    hidden_size: int = 768,
    token_size: int = 16,
) -> nn.Module:
    """The MONAI network ``name``; unet/dynunet downsample as ``pools`` says.

    ``filters`` shape unet/dynunet, ``res_units`` unet's residual units per level; ``feature_size``
    (None: MONAI's default) the others;
    ``final_patch``, ``hidden_size`` and ``token_size`` UNETR.
    """
    if deep_supervision and name not in ("dynunet", "dynunet_resenc"):
        raise PgpsError(f"deep supervision needs --network dynunet or dynunet_resenc; {name} has no auxiliary heads")
    if res_units != 1 and name != "unet":
        raise PgpsError(f"--res-units shapes --network unet; {name} has its own blocks (dynunet_resenc: residual "
                        "blocks at every level); leave --res-units at 1")
    if name in ("unet", "dynunet", "dynunet_resenc"):
        net = _unet(name, in_channels, num_classes, pools, filters, deep_supervision, res_units)
    elif name == "segresnet":
        from monai.networks.nets import SegResNet

        levels = min(pools)
        net = SegResNet(
            spatial_dims=3, init_filters=feature_size or 8, in_channels=in_channels, out_channels=num_classes,
            blocks_down=(1, 2, 2, 4, 4, 4, 4, 4, 4)[: levels + 1], blocks_up=(1,) * levels,
        )
    elif name == "swinunetr":
        from monai.networks.nets import SwinUNETR

        if (feature_size or 24) % 12:
            raise PgpsError(f"swinunetr needs a feature size that is a multiple of 12, got {feature_size}")
        net = SwinUNETR(in_channels=in_channels, out_channels=num_classes, feature_size=feature_size or 24,
                        spatial_dims=3, norm_name="instance")
    elif name == "unetr":
        if final_patch is None:
            raise PgpsError("unetr needs the final patch size (its position embeddings are a grid of it)")
        net = ProgressiveUNETR(in_channels, num_classes, final_patch, token_size, feature_size or 16, hidden_size)
    else:
        raise PgpsError(f"unknown network {name!r}; use one of {', '.join(NETWORKS)}")
    _swap_instance_norms(net)
    _guard_convs(net)
    return net


def _unet(
    name: str, in_channels: int, num_classes: int, pools: Sequence[int], filters: Sequence[int], deep_supervision: bool,
    res_units: int = 1,
) -> nn.Module:
    strides = level_strides(pools)
    if not strides:
        raise PgpsError(NO_DOWNSAMPLING)
    check_filters(name, pools, filters)
    levels = unet_levels(pools)
    chans = tuple(filters[:levels])
    if name == "unet":
        from monai.networks.nets import UNet

        return UNet(
            spatial_dims=3, in_channels=in_channels, out_channels=num_classes,
            channels=chans, strides=strides, num_res_units=res_units, norm="instance",
        )
    from monai.networks.nets import DynUNet

    return DynUNet(
        spatial_dims=3, in_channels=in_channels, out_channels=num_classes,
        kernel_size=[3] * (len(strides) + 1), strides=[1, *strides],
        upsample_kernel_size=strides, filters=chans, norm_name="instance",
        deep_supervision=deep_supervision, deep_supr_num=max(1, min(2, len(strides) - 1)),
        res_block=name == "dynunet_resenc",  # the residual-encoder preset: residual blocks at every level
    )


def memory_format(network: str, device: torch.device, patch: Sequence[int]) -> torch.memory_format:
    """The memory layout ``network`` computes in on ``device`` for patches of shape ``patch``."""
    if (CPU_CHANNELS_LAST and device.type == "cpu" and network in CHANNELS_LAST_NETWORKS
            and math.prod(patch) >= CHANNELS_LAST_MIN_VOXELS):
        return torch.channels_last_3d
    return torch.contiguous_format


def cpu_bf16(network: str, patch: Sequence[int], batch: int) -> bool:
    """Whether a CPU training step of ``batch`` patches of ``patch`` runs its forward pass under
    bfloat16 autocast (the rule above; the run's setting and the hardware are the trainer's to check)."""
    return network in CHANNELS_LAST_NETWORKS and batch * math.prod(patch) >= CPU_BF16_MIN_VOXELS


def place(model: nn.Module, network: str, device: torch.device, patch: Sequence[int]) -> nn.Module:
    """``model`` on ``device``, laid out for patches of shape ``patch`` (:func:`memory_format`).

    ``evaluate`` and ``predict`` place their network for the final patch, as the trainer does for its
    final stage and its validations, so all three compute the same numbers.  Inputs need no
    conversion: a convolution with channels-last weights gives a channels-last output whatever the
    input's layout.
    """
    return model.to(device).to(memory_format=memory_format(network, device, patch))


def network_for(config: TrainConfig, in_channels: int, num_classes: int, schedule: Schedule) -> nn.Module:
    """The run's network, after checking that it takes every patch of ``schedule``."""
    check_network_patches(config.network, schedule, config.token_size)
    return build_network(
        config.network, in_channels, num_classes, schedule.pools, config.filters, config.deep_supervision,
        final_patch=schedule.final_patch, feature_size=config.feature_size, hidden_size=config.hidden_size,
        token_size=config.token_size, res_units=config.res_units,
    )
