"""Answers nnU-Net's trainer lookup (``-tr nnUNetTrainerPGPS``, ``nnUNetv2_predict``).

The trainer is built on first access (:func:`pgps_tune.nnunet.trainer_class`), so this module
imports without nnunetv2 (pytest's doctest collection imports every module of the package),
and every name ``nnUNetTrainerPGPS`` or ``nnUNetTrainerPGPS_SUFFIX`` resolves to one class.
"""

from __future__ import annotations


def __getattr__(name: str) -> type:
    from pgps_tune.nnunet import is_trainer_name, trainer_class

    if is_trainer_name(name):
        return trainer_class(name)
    raise AttributeError(name)
