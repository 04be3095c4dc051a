"""The single-site experiment: FT, LP-FT, uniform-average + FT and MedMerge on one target,
driven by one YAML config (the twin of `federation`):

- `pipelines`: every pipeline declared once (`Pipeline`: id, label, per source or over all
  sources, the sources it needs, its function) in `REGISTRY`, which the config check, the
  runner, the report and the study drivers read;
- `config`: `ExperimentConfig`, the YAML config, checked key by key;
- `runner`: `run_experiment` and `RunContext`, the steps a pipeline composes;
- `run_folder`: `ExperimentRun`, the run folder: its layout, the resume check, what a finished
  method leaves and what a later reader (`saved_model`, the study drivers) finds;
- `tracking`: optional TensorBoard event files per method;
- `demo`: `medmerge demo`, the comparison end to end on synthetic data.

`run_experiment` is also importable from here, loaded on first use: reading a run folder
(`saved_model`) does not load the runner.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "run_experiment":
        from medmerge_core.experiment.runner import run_experiment

        return run_experiment
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
