"""Flower ServerApp and strategy of the MedMerge federation (thin adapters)."""
