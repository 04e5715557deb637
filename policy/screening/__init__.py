"""Screening of training data and sampled outputs.

`screener` holds the classifiers the screening policy names (the learned harmful-content
classifier `harm_classifier` by default; the behaviour-bank kNN `harmful_requests`,
`toxicity` (Detoxify, offline), operator `rules`, `structural` signals and a local `guard`
model as options), their per-category thresholds and the shared verdict cache; `batch`
splits a batch of training datums into what each classifier reads; `tally` keeps each
run's cumulative tally and makes the dataset-level decision; `metrics` counts flags. Must
not import fastapi or engine."""
