"""Screening of training data and sampled outputs (issue 5, in progress).

So far: structural signals (`structural`). Classifier registry, the verdict cache,
admission and output hooks come next. Must not import fastapi or engine."""
