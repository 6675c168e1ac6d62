"""Trainer settings and their defaults: the one place that says how a run trains.

Pure Python (no torch, no Ray).  ``pgps-tune train``, the ``budget`` section of a
space file and every search trial build their :class:`TrainConfig` from the
defaults here, so a schedule scored in a sweep and the same schedule trained by
hand use the same optimizer, learning rate and epoch length unless a flag or a
file says otherwise.

Why these defaults: AdamW at 3e-3 (fused, one kernel per step) reached a plateau on
MSD Hippocampus within a few thousand iterations on 2 CPU cores, where SGD at the
paper's 1e-2 needs the paper's 250,000 iterations (docs/BENCHMARKS.md); 50
iterations per epoch keeps validations frequent at CPU budgets.  ``--optimizer
sgd`` with its own default learning rate gives the paper's recipe.  Augmentation
is on by default with a preset close to nnU-Net's (``AUGMENT_PRESETS``), because a
curriculum found without it may not hold under the training people actually use.

It also says, as plain data, which networks exist and which patch sides each one
takes (:func:`patch_multiple`), so that schedules and spaces are checked before
torch is even imported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from pgps_tune.errors import PgpsError

if TYPE_CHECKING:
    from pgps_tune.schedule import Schedule

DEFAULT_EPOCHS = 50
DEFAULT_BATCH_SIZE = 2
OPTIMIZERS = ("adamw", "sgd")
DEFAULT_LR = {"adamw": 3e-3, "sgd": 1e-2}

# -- networks and the patch sides each one takes ------------------------------------------
# Plain data, so that schedule builders, space checks and the CLI can ask before torch is
# imported.  unet/dynunet follow the plan's poolings per axis; segresnet downsamples every
# axis alike, min(pools) times; swinunetr embeds 2^3 tokens then merges 4 times (2**5 = 32);
# unetr cuts the patch into tokens of ``token_size`` per side.
NETWORKS = ("unet", "dynunet", "dynunet_resenc", "segresnet", "swinunetr", "unetr")
TOKEN_SIZES = (2, 4, 8, 16, 32)


def patch_multiple(network: str, pools: Sequence[int], token_size: int = 16) -> tuple[int, int, int]:
    """What every patch side must be a multiple of for ``network`` (its smallest legal side).

    >>> patch_multiple("swinunetr", (3, 3, 3)), patch_multiple("segresnet", (2, 3, 3))
    ((32, 32, 32), (4, 4, 4))
    """
    if network in ("unet", "dynunet", "dynunet_resenc"):
        return tuple(2**p for p in pools)  # type: ignore[return-value]
    if network == "segresnet":
        return (2 ** min(pools),) * 3
    if network == "swinunetr":
        return (32, 32, 32)
    if network == "unetr":
        if token_size not in TOKEN_SIZES:
            raise PgpsError(f"token size {token_size} is not supported; use one of {', '.join(map(str, TOKEN_SIZES))}")
        return (token_size,) * 3
    raise PgpsError(f"unknown network {network!r}; use one of {', '.join(NETWORKS)}")


def check_network_patches(
    network: str, schedule: Schedule, token_size: int = 16, source: str = "the schedule"
) -> None:
    """Refuse, before training, a schedule with a patch the network cannot take (one line)."""
    need = patch_multiple(network, schedule.pools, token_size)
    smallest = "x".join(str(math.lcm(n, 2**p)) for n, p in zip(need, schedule.pools))
    what = "token size " + str(token_size) if network == "unetr" else "network"
    patches = [(f"stage {i} patch", st.patch_size) for i, st in enumerate(schedule.stages)]
    for name, patch in [*patches, ("final patch", schedule.final_patch)]:
        if any(p % n for p, n in zip(patch, need)):
            raise PgpsError(
                f"{source}: {name} {'x'.join(map(str, patch))} does not suit --network {network} ({what} needs "
                f"multiples of {'x'.join(map(str, need))} per axis); the smallest legal patch is {smallest}: "
                f"build the schedule for this network (its paper preset starts there) with a final patch of "
                f"such multiples"
            )


# -- augmentation presets ------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentPreset:
    """One augmentation recipe, plain data; ``pgps_tune.augment`` draws and applies it.

    Probabilities are per sample (``p_*``); ranges are (low, high).  Spatial transforms
    (rotation, scaling, mirroring, elastic) are one resampling of a larger region cut
    around the patch; intensity transforms follow in nnU-Net's order: noise, blur,
    brightness, contrast, low resolution, inverted gamma, gamma.  A patch whose largest
    side exceeds ``anisotropy_threshold`` times its smallest (the final patch decides)
    rotates, scales and deforms in-plane only, around its thin axis, as nnU-Net does.
    """

    p_rotation: float = 0.0
    rotation_deg: float = 0.0  # each axis in [-r, r]
    rotation_deg_inplane: float = 180.0  # anisotropic patches: about the thin axis only
    p_scale: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)  # > 1 zooms out (the patch sees a larger region)
    p_mirror: float = 0.0  # per axis
    p_elastic: float = 0.0
    elastic_magnitude: float = 0.0  # largest displacement, voxels
    elastic_spacing: int = 8  # voxels between control points of the displacement field
    p_noise: float = 0.0
    noise_variance: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.0
    blur_p_channel: float = 0.5
    blur_sigma: tuple[float, float] = (0.5, 1.0)  # voxels, drawn per axis
    p_brightness: float = 0.0
    brightness: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.0
    contrast: tuple[float, float] = (0.75, 1.25)
    p_lowres: float = 0.0
    lowres_p_channel: float = 0.5
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    p_gamma_inverted: float = 0.0
    p_gamma: float = 0.0
    gamma: tuple[float, float] = (0.7, 1.5)
    anisotropy_threshold: float = 3.0

    @property
    def is_identity(self) -> bool:
        return self == AugmentPreset()


# nnU-Net v2's nnUNetTrainer.get_training_transforms (elastic deformation off, as there);
# one difference: labels are resampled nearest-neighbour, not as interpolated one-hot maps.
_NNUNET = AugmentPreset(
    p_rotation=0.2, rotation_deg=30.0, p_scale=0.2, scale=(0.7, 1.4), p_mirror=0.5,
    p_noise=0.1, p_blur=0.2, p_brightness=0.15, p_contrast=0.15, p_lowres=0.25,
    p_gamma_inverted=0.1, p_gamma=0.3,
)
AUGMENT_PRESETS: dict[str, AugmentPreset] = {
    "default": _NNUNET,
    "elastic": replace(_NNUNET, p_elastic=0.2, elastic_magnitude=3.0),
    "light": AugmentPreset(p_rotation=0.2, rotation_deg=15.0, p_scale=0.2, scale=(0.85, 1.25), p_mirror=0.5,
                           p_brightness=0.15, p_contrast=0.15),
    "none": AugmentPreset(),
}


def augment_preset(name: str) -> AugmentPreset:
    """The preset called ``name``, or a one-line error listing the choices."""
    if name not in AUGMENT_PRESETS:
        raise PgpsError(f"unknown augmentation {name!r}; use one of {', '.join(AUGMENT_PRESETS)}")
    return AUGMENT_PRESETS[name]


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a run except the data and the schedule. Plain data."""

    network: str = "unet"  # one of NETWORKS
    filters: tuple[int, ...] = (16, 32, 64, 128, 256, 320)  # unet/dynunet channels per level
    deep_supervision: bool = False
    feature_size: int | None = None  # segresnet/swinunetr/unetr base width; None: MONAI's default (8/24/16)
    hidden_size: int = 768  # unetr transformer width (MLP 4x, one head per 64)
    token_size: int = 16  # unetr token side: every patch side must be a multiple of it
    augment: str = "default"  # a name in AUGMENT_PRESETS; "none" trains on plain crops
    optimizer: str = "adamw"  # "adamw" (default) or "sgd" (the paper's)
    lr: float | None = None  # None: DEFAULT_LR of the optimizer
    weight_decay: float = 3e-5
    momentum: float = 0.99  # SGD (Nesterov)
    iterations_per_epoch: int = 50
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    workers: int = 0
    fg_ratio: float = 0.5
    volumes_per_batch: int | None = None
    val_every: int | None = None  # epochs; default: about 10 validations per run
    sw_batch_size: int = 4
    sw_overlap: float = 0.25
    max_train_seconds: float | None = None  # stop early (after an epoch) past this budget

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["filters"] = list(self.filters)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`. A missing key raises KeyError: a stored config that lacks one
        was not written by this version, and guessing its network would load weights into the wrong one."""
        known = {f.name for f in fields(cls)}
        missing = sorted(known - set(d))
        if missing:
            raise KeyError(f"config lacks {missing}")
        values = {k: v for k, v in d.items() if k in known}
        if "filters" in values:
            values["filters"] = tuple(values["filters"])
        return cls(**values)

    def patch_multiple(self, pools: Sequence[int]) -> tuple[int, int, int]:
        """What every patch side must be a multiple of for this run's network."""
        return patch_multiple(self.network, pools, self.token_size)

    def replace(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)

    @classmethod
    def for_trial(cls, budget: dict[str, Any], params: dict[str, Any], device: str, threads: int) -> TrainConfig:
        """A search trial's config: the space's budget, overridden by sampled trainer parameters."""
        return cls(
            network=budget["network"], filters=tuple(budget["filters"]), optimizer=budget["optimizer"],
            lr=params.get("lr", budget["lr"]), iterations_per_epoch=budget["iterations_per_epoch"],
            seed=budget["seed"], device=device, threads=threads, fg_ratio=params.get("fg_ratio", budget["fg_ratio"]),
            val_every=budget["val_every"], token_size=budget["token_size"], augment=budget["augment"],
        )
