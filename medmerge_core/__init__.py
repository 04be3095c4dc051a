"""MedMerge Federation core: the science, with no Flower imports.

- `settings`: every training setting declared once (stage, probe, InMerge); also
  `differences`, the keys in which two configs differ; `coerce`: the one coercer that reads
  any settings dataclass, behind the YAML config, the federation's run config and the drivers'
  command lines;
- `models`: architectures (+ `cifar_resnet`, the CIFAR-10 ResNets, and `efficientnet_lite`,
  EfficientNet-Lite0), source loading, and the model-key helpers (norm, conv, mergeable keys);
- `merge`: MedMerge arithmetic (`MergedModel`, `bake`); `probe`: learning a merge (one code
  path for the pipelines, the demo and the federation's coordinator); `coefficients`: what a
  learned merge says kernel by kernel (the summary and the figure's preferred source);
- `inmerge`: InMerge on a live model, on a state dict and on an aggregate;
- `train`: `Runtime` (device, AMP, channels_last), the one `TrainStep`, `train_one_epoch` and
  the `fit` loop that composes them (with its `FitOptions`); `checkpointing`: a stage's record
  and its resume file (`StageCheckpoint`); `cpu_autocast`: CPU bf16 autocast around a oneDNN
  convolution bug; `batches`: cached LP features; `progress`: what a person watching a stage sees;
- `experiment`: the single-site experiment, the twin of `federation`: the pipeline registry
  (FT / LP-FT / Avg+FT / MedMerge and the controls), its YAML config, runner, run folder,
  tracking and demo;
- `pretrain`: a source backbone pretrained on a task; `cli`: the `medmerge` command;
  `report`: result tables and figures; `io`: atomic writes; `errors`: the one-line input error;
  `provenance`: the software, commit and hardware recorded beside a result;
- `metrics`: accuracy / macro-F1 / AUROC, the clinical report, metrics pooled over sites;
- `saved_model`: a trained model outside its run, found, read with its preprocessing and
  scored (`medmerge evaluate`); `export` writes it out (`medmerge export`);
- `corruptions`: the image corruptions of the robustness studies;
- `data`: datasets and formats; `federation`: what the Flower adapters delegate to.
"""

__version__ = "0.1.0"
