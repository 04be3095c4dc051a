"""MedMerge Federation core: the science, with no Flower imports.

- `settings`: every training setting, declared once, and the one coercer that reads them;
- `models` (+ `cifar_resnet`): architectures, source loading, model-key helpers;
- `merge`: MedMerge arithmetic (`MergedModel`, `bake`); `probe`: learning a merge;
- `inmerge`: in-model kernel merging; `train`: `Runtime` and the one `fit` loop;
- `experiment`: the single-site experiment: the pipeline registry (FT / LP-FT / Avg+FT /
  MedMerge), its YAML config, runner, run folder, tracking and demo;
- `pretrain`, `saved_model` (a trained model outside its run), `export`, `cli`, `report`,
  `metrics`, `io`;
- `data`: datasets and formats; `federation`: what the Flower adapters delegate to.
(`config` and `demo` here only hand on the names of `experiment.config` / `experiment.demo`.)
"""

__version__ = "0.1.0"
