"""MedMerge Federation core: models, merging, data and training, with no Flower imports."""

__version__ = "0.1.0"
