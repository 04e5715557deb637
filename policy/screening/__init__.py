"""Screening of training data and sampled outputs (issue 5, in progress).

So far: structural signals (`structural`), the harmful-request screen
(`harmful_requests`: MiniLM kNN margins against behaviour banks in `banks/`) and the
toxicity screen (`toxicity`: Detoxify offline, pinned, windowed). Operator rules, the
classifier registry with policy thresholds, the verdict cache and the admission and
output hooks come next. Must not import fastapi or engine."""
