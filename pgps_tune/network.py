"""Networks: MONAI UNet and DynUNet, shaped by the plan's poolings per axis.

The paper's first stage is one pooling increment per axis, which leaves a
1x1x1 bottleneck; PyTorch's instance norm refuses a single spatial element in
training.  Normalising one element gives exactly zero (x - mean(x) = 0), so
we swap in :class:`SafeInstanceNorm3d`, which returns that limit (the affine
bias) instead of raising.  That is what the paper's code does by lifting the
check, and it keeps the published stage list trainable unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pgps_tune.errors import PgpsError

NETWORKS = ("unet", "dynunet")


class SafeInstanceNorm3d(nn.InstanceNorm3d):
    """Instance norm that maps a 1x1x1 input to its limit instead of raising."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2:].numel() > 1:
            return super().forward(x)
        out = torch.zeros_like(x)
        if self.affine:
            out = out + self.bias.view(1, -1, 1, 1, 1)
        return out


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


def build_network(
    name: str,
    in_channels: int,
    num_classes: int,
    pools: Sequence[int],
    filters: Sequence[int] = (16, 32, 64, 128, 256, 320),
    deep_supervision: bool = False,
) -> nn.Module:
    """A MONAI ``unet`` or ``dynunet`` whose downsampling matches ``pools``."""
    strides = level_strides(pools)
    if not strides:
        raise PgpsError("pools are all 0; the network needs at least one downsampling")
    if len(filters) < len(strides) + 1:
        raise PgpsError(f"need {len(strides) + 1} filter sizes for {len(strides)} poolings, got {list(filters)}")
    chans = tuple(filters[: len(strides) + 1])
    if name == "unet":
        from monai.networks.nets import UNet

        if deep_supervision:
            raise PgpsError("deep supervision needs --network dynunet; MONAI's UNet has no auxiliary heads")
        net: nn.Module = UNet(
            spatial_dims=3, in_channels=in_channels, out_channels=num_classes,
            channels=chans, strides=strides, num_res_units=1, norm="instance",
        )
    elif name == "dynunet":
        from monai.networks.nets import DynUNet

        net = DynUNet(
            spatial_dims=3, in_channels=in_channels, out_channels=num_classes,
            kernel_size=[3] * (len(strides) + 1), strides=[1, *strides],
            upsample_kernel_size=strides, filters=chans, norm_name="instance",
            deep_supervision=deep_supervision, deep_supr_num=max(1, min(2, len(strides) - 1)),
            res_block=False,
        )
    else:
        raise PgpsError(f"unknown network {name!r}; use one of {', '.join(NETWORKS)}")
    _swap_instance_norms(net)
    return net
