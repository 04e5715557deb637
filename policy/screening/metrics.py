"""Prometheus counts of screening flags that refused or withheld something in this process,
per source and "classifier.category".

In-process values on prometheus_client's default registry: the API process counts the
training batches and sampling prompts it refuses; the process that runs the worker (the
API's embedded one, or a `loragate worker`) counts the sampled outputs it withholds.
Dry runs and the release gate's judging are not counted: they refuse nothing. Categories
come from the active classifiers, so the label set is bounded. Must not decide anything
(the screener and the tally do), and must not import fastapi or engine.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter

TRAINING = "training"  # a datum of a refused forward/forward_backward batch
SAMPLING_PROMPT = "sampling_prompt"  # a turn of a refused sampling prompt
SAMPLED_OUTPUT = "sampled_output"  # a sampled sequence the output screen withheld
SOURCES = (TRAINING, SAMPLING_PROMPT, SAMPLED_OUTPUT)

FLAGS = Counter(
    "loragate_screening_flags",
    "Items flagged by screening in this process, one per item and category: training "
    "datums of refused batches, turns of refused sampling prompts, withheld sampled outputs",
    ["source", "category"])


def count_flags(source: str, flagged: Iterable[Iterable[str]]) -> None:
    """Count each item's distinct categories once; `flagged` holds one entry per item
    (an item flagged in no category counts nothing)."""
    if source not in SOURCES:
        raise ValueError(f"unknown screening source {source!r}")
    for categories in flagged:
        for category in set(categories):
            FLAGS.labels(source=source, category=category).inc()
