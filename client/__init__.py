"""Flower ClientApp of the MedMerge federation (a thin adapter over medmerge_core)."""
