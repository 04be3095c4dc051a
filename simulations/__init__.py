"""Study drivers, each writing its own RESULTS.md section:

- `reproduce`: the paper's comparison, ablations and three sources on a MedMNIST target (the
  command line over `study`, what runs, and `reproduce_report`, tables, statistics, figures,
  whose paired comparisons and Holm families are `reproduce_findings`);
- `label_efficiency`: `reproduce` at several label budgets;
- `faithful`: MedMerge on its premise (the ImageNet EfficientNet-Lite0 and a related medical
  source, every control); `faithful_report` its report; `faithful_inmerge` InMerge on the
  same footing, `faithful_inmerge_runs` its runs;
- `federated_probe`: who learns the merge, a coordinator or the sites;
  `federated_probe_runs` its settings and runs;
- `robustness`: InMerge against image corruptions; `probe_sweep`: the probe's defaults,
  chosen on validation;
- `stats` (bootstrap CI + Wilcoxon), `equivalence` (hierarchical paired bootstrap and
  verdicts), `departures` (how a proxy study departs from the paper, in shared words),
  `common` (shared helpers) and `inprocess` (an in-process Flower Grid for tests, benchmarks
  and the federated study);
- `paper/`: one `medmerge run` config per Table 1 pair; `configs/`: the pilot's config.
"""
