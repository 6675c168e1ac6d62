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

A :class:`Recipe` (a ``TrainConfig`` plus :class:`DataIdentity`) is how a schedule was
trained where it was scored; every trial records one and a sweep's schedule files carry it,
so ``train --schedule`` repeats the trial, and the values read back from a file are checked
here (:meth:`TrainConfig.parse`, the same checks as the train flags).

It also says, as plain data, which networks exist and which patch sides each one
takes (:func:`patch_multiple`), so that schedules and spaces are checked before
torch is even imported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from pgps_tune.errors import PgpsError, did_you_mean
from pgps_tune.limits import LIMITS

if TYPE_CHECKING:
    from pgps_tune.schedule import Schedule

DEFAULT_EPOCHS = 50
DEFAULT_BATCH_SIZE = 2
OPTIMIZERS = ("adamw", "sgd")
DEFAULT_LR = {"adamw": 3e-3, "sgd": 1e-2}
DEVICES = ("auto", "cpu", "cuda")
# The arithmetic of a CPU training step: "bf16" autocasts the network's forward pass to bfloat16
# where the CPU computes it in hardware (AVX512-BF16 or AMX) and the batch is large enough to gain
# (pgps_tune.network.cpu_bf16), fp32 elsewhere; "fp32" never autocasts.  CUDA trains
# with fp16 AMP either way.  Validation, evaluate and predict compute in fp32 on the CPU.
CPU_PRECISIONS = ("bf16", "fp32")
# Settings added after runs and files were first written, with the value those older runs trained
# with: a stored config or schedule file that lacks the key is read with it (not with today's default)
ADDED_LATER: dict[str, Any] = {"cpu_precision": "fp32", "res_units": 1}

# -- networks and the patch sides each one takes ------------------------------------------
# Plain data, so that schedule builders, space checks and the CLI can ask before torch is
# imported.  unet/dynunet follow the plan's poolings per axis; segresnet downsamples every
# axis alike, min(pools) times; swinunetr embeds 2^3 tokens then merges 4 times (2**5 = 32);
# unetr cuts the patch into tokens of ``token_size`` per side.
NETWORKS = ("unet", "dynunet", "dynunet_resenc", "segresnet", "swinunetr", "unetr")
TOKEN_SIZES = (2, 4, 8, 16, 32)
UNET_NETWORKS = ("unet", "dynunet", "dynunet_resenc")  # shaped by the plan's pools and ``filters``


def unet_levels(pools: Sequence[int]) -> int:
    """Widths a unet/dynunet needs for ``pools``: one per pooling level, plus the top one.

    >>> unet_levels((3, 3, 2))
    4
    """
    return max(pools) + 1


# pools of all 0 (no stride-2 downsampling on any axis): refused by the schedule core, so that schedule, train and
# tune give the same line (a unet/dynunet cannot be built without a downsampling level)
NO_DOWNSAMPLING = ("pools are all 0, but the network needs at least one downsampling; give at least one axis a pool "
                   "of 1 or more (pools are stride-2 downsamplings per axis, e.g. 4 4 4; 'pgps-tune plan --data DIR' "
                   "plans them)")


def check_filters(network: str, pools: Sequence[int], filters: Sequence[int], what: str = "--filters") -> None:
    """Refuse ``filters`` (``what`` says where they come from) too few for a unet/dynunet that pools ``pools``.

    The one refusal that ``train`` (before the data are prepared) and ``tune`` give alike.

    >>> check_filters("unet", (5, 5, 4), (16, 32, 64, 128, 256, 320)); check_filters("segresnet", (6, 6, 6), ())
    """
    levels = unet_levels(pools)
    if network in UNET_NETWORKS and len(filters) < levels:
        raise PgpsError(f"{what} {list(filters)} gives {len(filters)} widths, but the pools {list(pools)} "
                        f"downsample {max(pools)} times and {network} needs {levels}; give fewer pools, or at least "
                        f"{levels} widths (e.g. --filters {' '.join(str(16 * 2 ** i) for i in range(levels))})")


def patch_multiple(network: str, pools: Sequence[int], token_size: int = 16) -> tuple[int, int, int]:
    """What every patch side must be a multiple of for ``network`` (its smallest legal side).

    >>> patch_multiple("swinunetr", (3, 3, 3)), patch_multiple("segresnet", (2, 3, 3))
    ((32, 32, 32), (4, 4, 4))
    """
    if network in UNET_NETWORKS:
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


# The base widths each network takes: swinunetr's attention heads (3, 6, 12, 24) split its
# feature size, segresnet's group norm has 8 groups; unetr has one attention head per 64 of its
# hidden size.  unet/dynunet take their widths from ``filters`` instead.
FEATURE_MULTIPLE = {"segresnet": 8, "swinunetr": 12, "unetr": 1}
WIDTH_NETWORKS = {"feature_size": tuple(FEATURE_MULTIPLE), "hidden_size": ("unetr",), "res_units": ("unet",)}


def check_network_widths(
    network: str, feature_size: int | None, hidden_size: int, names: tuple[str, str] = ("feature size", "hidden size")
) -> None:
    """Refuse, before training, a width the network cannot be built with (one line naming ``names``).

    Widths a network does not use are not checked here (a recipe carries both for every network).

    >>> check_network_widths("swinunetr", 12, 768); check_network_widths("unetr", 8, 192)
    >>> check_network_widths("swinunetr", 16, 768)
    Traceback (most recent call last):
    pgps_tune.errors.PgpsError: feature size 16 does not suit swinunetr: it needs a multiple of 12 (e.g. 12, 24, 48)
    """
    step = FEATURE_MULTIPLE.get(network)
    if feature_size is not None and step is not None and feature_size % step:
        raise PgpsError(f"{names[0]} {feature_size} does not suit {network}: it needs a multiple of {step} "
                        f"(e.g. {step}, {2 * step}, {4 * step})")
    if network == "unetr" and hidden_size > 64 and hidden_size % 64:
        raise PgpsError(f"{names[1]} {hidden_size} does not suit unetr: it needs a multiple of 64 (one attention "
                        "head per 64) or at most 64 (one head), e.g. 192 or 768")


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
    res_units: int = 1  # unet: residual units per level (MONAI's num_res_units; 2 doubles its depth)
    deep_supervision: bool = False
    feature_size: int | None = None  # segresnet/swinunetr/unetr base width; None: MONAI's default (8/24/16)
    hidden_size: int = 768  # unetr transformer width (MLP 4x, one head per 64)
    token_size: int = 16  # unetr token side: every patch side must be a multiple of it
    augment: str = "default"  # a name in AUGMENT_PRESETS; "none" trains on plain crops
    cpu_precision: str = "bf16"  # one of CPU_PRECISIONS
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
        """The learning rate: ``lr``, else the optimizer's default (an unknown optimizer is named, not a KeyError)."""
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR[check_train_value("optimizer", self.optimizer, "TrainConfig.optimizer")]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["filters"] = list(self.filters)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`. A missing key raises KeyError: a stored config that lacks one
        was not written by this version, and guessing its network would load weights into the wrong one."""
        known = {f.name for f in fields(cls)}
        d = {**ADDED_LATER, **d}
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
        """A search trial's config: the space's budget, overridden by sampled trainer parameters.

        Numbers are made plain Python (a sampler may hand numpy ones), so the recipe a trial
        records is plain JSON.
        """
        lr = params.get("lr", budget["lr"])
        return cls(
            network=budget["network"], filters=tuple(int(f) for f in budget["filters"]),
            res_units=int(budget.get("res_units", ADDED_LATER["res_units"])),
            optimizer=budget["optimizer"], lr=None if lr is None else float(lr),
            iterations_per_epoch=int(budget["iterations_per_epoch"]), seed=int(budget["seed"]), device=device,
            threads=threads, fg_ratio=float(params.get("fg_ratio", budget["fg_ratio"])),
            val_every=int(budget["val_every"]), token_size=int(budget["token_size"]), augment=budget["augment"],
            # a sweep started before the widths were budget keys trained with the defaults
            feature_size=None if budget.get("feature_size") is None else int(budget["feature_size"]),
            hidden_size=int(budget.get("hidden_size", cls.hidden_size)),
            cpu_precision=budget.get("cpu_precision", ADDED_LATER["cpu_precision"]),
        )

    def check(self, where: str = "TrainConfig") -> None:
        """Refuse, in one line naming the field, any setting out of its range or list: a config built in Python
        gets the checks a file's or a flag's value gets (``fg_ratio=2.0`` or ``threads=0`` would fail later, or
        train something else without a word). NumPy scalars count as the Python numbers they hold."""
        for f in fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "item") and not isinstance(value, list | tuple | str):
                value = value.item()  # a NumPy scalar from a grid or a sampler
            elif isinstance(value, list | tuple) and f.name == "filters":
                value = [v.item() if hasattr(v, "item") else v for v in value]
            check_train_value(f.name, value, f"{where}.{f.name}")
        check_network_widths(self.network, self.feature_size, self.hidden_size,
                             (f"{where}.feature_size", f"{where}.hidden_size"))

    @classmethod
    def parse(cls, data: Any, where: str) -> TrainConfig:
        """A config read from a file (a schedule file's ``recipe.train``), every value checked.

        Unknown keys and out-of-range values are refused in one line naming the key; a missing
        key takes its default (a file written before that setting existed trained with it), or
        for a key in ``ADDED_LATER`` the value such a file trained with.
        """
        if not isinstance(data, dict):
            raise PgpsError(f"{where} must be a mapping of trainer settings, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known), key=str)
        if unknown:
            raise PgpsError(f"{where}: unknown key(s) {unknown}{did_you_mean(unknown, known)}; remove them "
                            f"(allowed: {', '.join(known)})")
        cfg = cls(**{k: check_train_value(k, v, f"{where}.{k}") for k, v in {**ADDED_LATER, **data}.items()})
        check_network_widths(cfg.network, cfg.feature_size, cfg.hidden_size,
                             (f"{where}.feature_size", f"{where}.hidden_size"))
        return cfg


# Trainer settings that are a name from a fixed list, and the settings that may be null (their
# default is None: "the network's or optimizer's own")
_CHOICES: dict[str, tuple[Any, ...]] = {
    "network": NETWORKS, "optimizer": OPTIMIZERS, "augment": tuple(AUGMENT_PRESETS), "device": DEVICES,
    "token_size": TOKEN_SIZES, "cpu_precision": CPU_PRECISIONS,
}
_NULLABLE = {f.name for f in fields(TrainConfig) if f.default is None}


def check_train_value(name: str, value: Any, what: str) -> Any:
    """One trainer setting, checked (a file's value or a flag's): the value, or a one-line error naming ``what``."""
    if value is None and name in _NULLABLE:
        return None
    if name in _CHOICES:
        # the exact type too: 16.0 == 16 and True == 1, but a float token size breaks the network's arithmetic
        if not any(type(value) is type(c) and value == c for c in _CHOICES[name]):
            kind = {"augment": "augmentation", "token_size": "token size",
                    "cpu_precision": "CPU precision"}.get(name, name)
            raise PgpsError(f"{what}: unknown {kind} {value!r}; use one of {', '.join(map(str, _CHOICES[name]))}")
        return value
    if name == "deep_supervision":
        if not isinstance(value, bool):
            raise PgpsError(f"{what} must be true or false, got {value!r}")
        return value
    if name == "filters":
        if not isinstance(value, list | tuple) or not 1 <= len(value) <= 10:
            raise PgpsError(f"{what} must be a list of 1 to 10 channel counts, got {value!r}")
        return tuple(LIMITS["filters"].check(v, f"{what} entries") for v in value)
    return LIMITS[name].check(value, what)  # every number has its range in pgps_tune.limits


# -- the recipe: everything a schedule file needs to reproduce the run that scored it ---------------

RECIPE_VERSION = 1


# pgps_tune.intensity's schemes (type: the keys besides it): what a recipe's normalisation may say
SCHEMES: dict[str, tuple[str, ...]] = {"ct": ("lower", "upper", "mean", "sd"), "zscore": (), "none": (),
                                       "rescale": (), "rgb": ()}


def _check_scheme(n: dict[str, Any], where: str) -> None:
    """Refuse a normalisation entry that is not one of :data:`SCHEMES` as preprocessing writes it."""
    kind = n.get("type")
    if kind not in SCHEMES:
        raise PgpsError(f"{where}.type {kind!r} is not a normalisation scheme; use one of {', '.join(SCHEMES)} "
                        "(as the preprocessing of the data wrote it), or delete the recipe's normalisation")
    want = SCHEMES[kind]
    extra = sorted(set(n) - {"type", *want}, key=str)
    missing = [k for k in want if k not in n]
    if extra or missing:
        what = f"unknown key(s) {extra}" if extra else f"lacks {', '.join(missing)}"
        raise PgpsError(f"{where}: {what}; a {kind} entry has "
                        f"{'type, ' + ', '.join(want) if want else 'only type'}")
    if want:
        v = [n[k] for k in want]
        if not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v) or (
                v[0] > v[1] or v[3] < 0):
            raise PgpsError(f"{where}: lower, upper, mean and sd must be finite numbers with lower <= upper and "
                            f"sd >= 0, got {dict(zip(want, v))}")


@dataclass(frozen=True)
class DataIdentity:
    """What a recipe was trained on: the data, its preprocessing and the validation split.

    ``val_fraction``/``split_seed`` and, for synthetic data, ``synthetic_cases``/``synthetic_shape``
    are applied by ``pgps-tune train --schedule``; ``dataset``, ``source``, ``spacing`` and
    ``normalisation`` tell a reader (and train's notes) what the data was.  ``normalisation`` entries are
    checked (one of :data:`SCHEMES`, as preprocessing writes them), and train refuses a recipe whose schemes
    are not those it will apply to the same dataset.
    """

    dataset: str
    source: str  # the sweep's --data: a dataset folder, or "synthetic"
    val_fraction: float
    split_seed: int
    spacing: tuple[float, ...] = ()
    normalisation: tuple[dict[str, Any], ...] = ()
    synthetic_cases: int | None = None
    synthetic_shape: tuple[int, int, int] | None = None

    @classmethod
    def of(cls, ds: Any, source: str, val_fraction: float, split_seed: int, synthetic_cases: int | None = None,
           synthetic_shape: Sequence[int] | None = None) -> DataIdentity:
        """The identity of a prepared dataset (``pgps_tune.data.PreparedDataset``) and its split."""
        synthetic = str(source) == "synthetic"
        return cls(
            dataset=ds.name, source=str(source), val_fraction=float(val_fraction), split_seed=int(split_seed),
            spacing=tuple(float(v) for v in ds.spacing), normalisation=tuple(dict(n) for n in ds.normalisation),
            synthetic_cases=int(synthetic_cases) if synthetic and synthetic_cases is not None else None,
            synthetic_shape=tuple(int(v) for v in synthetic_shape) if synthetic and synthetic_shape else None,  # type: ignore[arg-type]
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spacing"], d["normalisation"] = list(self.spacing), [dict(n) for n in self.normalisation]
        if self.synthetic_cases is None and self.synthetic_shape is None:
            del d["synthetic_cases"], d["synthetic_shape"]
        else:
            d["synthetic_shape"] = list(self.synthetic_shape or ())
        return d

    @classmethod
    def parse(cls, data: Any, where: str) -> DataIdentity:
        if not isinstance(data, dict):
            raise PgpsError(f"{where} must be a mapping (dataset, source, val_fraction, split_seed, ...), "
                            f"got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known), key=str)
        if unknown:
            raise PgpsError(f"{where}: unknown key(s) {unknown}{did_you_mean(unknown, known)}; remove them "
                            f"(allowed: {', '.join(known)})")
        missing = [k for k in ("dataset", "source", "val_fraction", "split_seed") if k not in data]
        if missing:
            raise PgpsError(f"{where} lacks {', '.join(missing)}; add them, or delete the recipe to train with "
                            "the defaults")
        for k in ("dataset", "source"):
            if not isinstance(data[k], str) or not data[k]:
                raise PgpsError(f"{where}.{k} must be a non-empty string, got {data[k]!r}")
        spacing = data.get("spacing", [])
        if not isinstance(spacing, list) or len(spacing) not in (0, 3) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in spacing):
            raise PgpsError(f"{where}.spacing must be a list of 3 positive numbers (mm, x y z), got {spacing!r}")
        norm = data.get("normalisation", [])
        if not isinstance(norm, list) or not all(isinstance(n, dict) for n in norm):
            raise PgpsError(f"{where}.normalisation must be a list of mappings (one per channel), got {norm!r}")
        for i, n in enumerate(norm):
            _check_scheme(n, f"{where}.normalisation[{i}]")
        shape = data.get("synthetic_shape")
        if shape is not None and (not isinstance(shape, list) or len(shape) != 3):
            raise PgpsError(f"{where}.synthetic_shape must be a list of 3 integers, got {shape!r}")
        cases = data.get("synthetic_cases")
        return cls(
            dataset=data["dataset"], source=data["source"],
            val_fraction=LIMITS["val_fraction"].check(data["val_fraction"], f"{where}.val_fraction"),
            split_seed=LIMITS["split_seed"].check(data["split_seed"], f"{where}.split_seed"),  # type: ignore[arg-type]
            spacing=tuple(float(v) for v in spacing), normalisation=tuple(norm),
            synthetic_cases=None if cases is None else LIMITS["synthetic_cases"].check(  # type: ignore[arg-type]
                cases, f"{where}.synthetic_cases"),
            synthetic_shape=None if shape is None else tuple(  # type: ignore[arg-type]
                LIMITS["synthetic_axis"].check(v, f"{where}.synthetic_shape") for v in shape),
        )


@dataclass(frozen=True)
class Recipe:
    """How a schedule was trained where it was scored: the trainer settings and the data.

    A sweep's exported schedule files carry the recipe of the trial they come from, so that
    ``pgps-tune train --schedule FILE`` on the same data trains that trial again.
    """

    train: TrainConfig
    data: DataIdentity

    def to_dict(self) -> dict[str, Any]:
        return {"version": RECIPE_VERSION, "train": self.train.to_dict(), "data": self.data.to_dict()}

    @classmethod
    def parse(cls, data: Any, where: str = "recipe") -> Recipe:
        """A recipe read from a file, every key and value checked (one-line errors naming the key)."""
        if not isinstance(data, dict):
            raise PgpsError(f"{where} must be a mapping with version, train and data, got {type(data).__name__}")
        unknown = sorted(set(data) - {"version", "train", "data"}, key=str)
        if unknown:
            raise PgpsError(f"{where}: unknown key(s) {unknown}{did_you_mean(unknown, ['version', 'train', 'data'])}"
                            "; remove them (allowed: version, train, data)")
        if "version" not in data:
            raise PgpsError(f"{where} lacks 'version' (a recipe starts with 'version: {RECIPE_VERSION}'); re-export "
                            "the sweep, or delete the recipe to train with the defaults")
        if type(data.get("version")) is not int or data["version"] != RECIPE_VERSION:  # not true, not 1.0
            raise PgpsError(f"{where}.version {data.get('version')!r} is not supported; this pgps-tune reads "
                            f"version {RECIPE_VERSION} (re-export the sweep, or delete the recipe to train with "
                            "the defaults)")
        for k in ("train", "data"):
            if k not in data:
                raise PgpsError(f"{where} lacks '{k}'; re-export the sweep, or delete the recipe to train with "
                                "the defaults")
        return cls(TrainConfig.parse(data["train"], f"{where}.train"), DataIdentity.parse(data["data"],
                                                                                         f"{where}.data"))
