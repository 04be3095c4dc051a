"""Datasets: `registry` reads a data spec (format + options) into a `base.TaskData`; the formats
(`medmnist`, `synthetic` with its drawing primitives in `synthetic_shapes`, and the papers'
layouts under `formats/`) share `splits` (split files, label budgets), `labels` (label checks
before anything is written), `images` and `cache`."""
