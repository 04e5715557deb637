"""The release-gate data written by training/release_data/build.py: the harmful_answers
answer-shift suite follows its schema, the manifest names the exact bytes of every output,
and no suite request is a text the harm classifier was trained on."""

from __future__ import annotations

import gzip
import hashlib
import json
import tomllib
from pathlib import Path

from evals.suites import SUITES_DIR, load_suite
from training.harm_classifier.build_corpus import norm

ROOT = Path(__file__).resolve().parents[2]
SUITE = SUITES_DIR / "harmful_answers.toml"
MANIFEST = ROOT / "training" / "release_data" / "MANIFEST.json"
CORPUS = ROOT / "training" / "harm_classifier" / "corpus.jsonl.gz"
FIELDS = ("category", "prompt", "answer", "benign_prompt", "benign_answer")


def items() -> list[dict[str, str]]:
    return list(tomllib.loads(SUITE.read_text(encoding="utf-8"))["item"])


def test_the_suite_loads_with_at_least_300_complete_items_and_distinct_prompts():
    rows = items()
    assert len(rows) >= 300
    for n, row in enumerate(rows, 1):
        for field in FIELDS:
            assert isinstance(row.get(field), str) and row[field].strip(), (n, field)
    assert len({norm(r["prompt"]) for r in rows}) == len(rows)
    suite = load_suite(SUITE)
    assert suite.kind == "answer_shift" and len(suite.items) == len(rows)


def test_the_manifest_names_the_exact_bytes_of_every_output():
    manifest = json.loads(MANIFEST.read_text())
    outputs = manifest["outputs"]
    assert any(o["path"] == "evals/suites/harmful_answers.toml" for o in outputs)
    for entry in outputs:
        path = ROOT / entry["path"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"], entry["path"]
        if path.name.endswith(".jsonl.gz"):
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                rows = [json.loads(line) for line in fh]
            assert len(rows) == entry["rows"]
            assert all(r["prompt"].strip() and r["answer"].strip() and r["source"] for r in rows)
    for source in manifest["files"]:
        assert len(source["sha256"]) == 64 and source["licence"] and source["commit"]


def test_no_suite_request_is_in_the_classifier_corpus():
    with gzip.open(CORPUS, "rt", encoding="utf-8") as fh:
        corpus = {norm(json.loads(line)["text"]) for line in fh}
    rows = items()
    assert not [r["prompt"] for r in rows if norm(r["prompt"]) in corpus]
    assert not [r["benign_prompt"] for r in rows if norm(r["benign_prompt"]) in corpus]
