"""pgps-tune: find the best patch-size curriculum for 3D segmentation, per dataset."""

__version__ = "0.1.0"
