"""nnU-Net's external-trainer folder for pgps-tune: point ``nnUNet_extTrainer`` here.

nnU-Net imports every module in this folder as a top-level module and looks for the trainer
name in it, so the folder holds exactly one small module (:mod:`.pgps_tune_trainer`).
"""
