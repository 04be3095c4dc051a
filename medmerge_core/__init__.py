"""MedMerge Federation core: the science, with no Flower imports.

- `settings`: every training setting, declared once, and the one coercer that reads them;
- `models` (+ `cifar_resnet`): architectures, source loading, model-key helpers;
- `merge`: MedMerge arithmetic (`MergedModel`, `bake`); `probe`: learning a merge;
- `inmerge`: in-model kernel merging; `train`: `Runtime` and the one `fit` loop;
- `experiment`: the FT / LP-FT / Avg+FT / MedMerge pipelines and their run folder, read from
  the YAML config (`config`); `pretrain`, `demo`, `cli`, `report`, `metrics`, `io`;
- `data`: datasets and formats; `federation`: what the Flower adapters delegate to.
"""

__version__ = "0.1.0"
