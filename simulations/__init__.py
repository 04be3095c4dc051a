"""Study drivers, each writing its own RESULTS.md section: `reproduce` (over `study` and
`reproduce_report`), `label_efficiency`, `robustness`, `probe_sweep`; `stats` (paired
comparisons), `common` (shared helpers) and `inprocess` (an in-process Flower Grid)."""
