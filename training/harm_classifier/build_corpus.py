"""Build the harmful-content classifier's corpus from public labelled sets.

Reads pinned snapshots of public repositories (git directories, e.g. as the project's `fetch`
tool leaves them under /work/.mirror/OWNER+NAME/repo, or any clone: pass --mirror) and writes

    training/harm_classifier/corpus.jsonl.gz   one row per text: text, label
                                               (harmful | everyday | borderline), source,
                                               category (one of the 8 harm categories or null),
                                               split (train | val | heldout)
    training/harm_classifier/MANIFEST.json     per source file: repo, commit, path, licence,
                                               SHA-256 of the raw file, rows kept

Whole sources are held out for the benchmark (HELDOUT below) so its numbers are on sources the
classifier never saw; the rest is split 80/20 into train/val per source with a fixed seed.

Texts reserved for independent evaluation are never used: their sets (HarmBench, StrongREJECT,
JailbreakBench, XSTest, AdvBench, ...) are never read, and every row whose normalized text has
its SHA-256 in ../shared/reserved/hashes.txt is dropped (the same normalization and candidate
extraction as ../shared/reserved/check.py, applied to the row and to its JSON line).

    python training/harm_classifier/build_corpus.py [--mirror /work/.mirror]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import random
import re
import subprocess
import sys
import tomllib
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RESERVED = ROOT.parent / "shared" / "reserved" / "hashes.txt"
SEED = 20261201
VAL_SHARE = 0.2

# Sources held out whole: benchmark numbers are on sources the classifier never saw.
HELDOUT = {"simplesafetytests", "maliciousinstruct", "mt_bench", "vicuna_bench", "oktest"}

CATEGORIES = ("chemical_biological_weapons", "explosives_and_weapons", "cyber_attacks",
              "violence", "self_harm", "fraud_and_crime", "hate_and_harassment", "drugs")

# Capped large everyday sources (random sample with the fixed seed), to keep the corpus
# small and the label mix sane.
CAPS = {"gsm8k": 1500, "toxicchat_nontoxic": 2500, "codealpaca": 1500,
        "alpaca_eval_output": 300, "codealpaca_output": 300, "gsm8k_output": 300,
        "stl_safety_only_output": 400, "coconot_output": 300,
        "alpaca_eval_sentence_output": 1200, "codealpaca_sentence_output": 300,
        "gsm8k_sentence_output": 400, "stl_safety_only_sentence_output": 1200,
        "coconot_sentence_output": 1200}
# Model-written answers (sources ending "_output"): benign sampled text, refusals of harmful
# requests included — trained on as benign (a refusal naming the harm is not harmful text)
# and, in val, for calibrating the threshold on sampled outputs.
OUTPUT_SUFFIX = "_output"

REPOS = {
    "red-instruct": ("declare-lab/red-instruct", "73c759c93d2f6b1d8c7b058ab7bcec5fb0c28fa2",
                     "Apache-2.0"),
    "stl": ("vinid/safety-tuned-llamas", "36a4b8d5c2177ed165bf61f59b590161394f7f12",
            "CC-BY-NC-4.0"),
    "ailuminate": ("mlcommons/ailuminate", "769cc2be9d20c8d4fb26ce53b68865ed41dfb8e2",
                   "CC-BY-4.0"),
    "sst": ("bertiev/SimpleSafetyTests", "d7aee9a9422a5a5488f478fd79c2479c891c0f3b",
            "CC-BY-4.0"),
    "jailbreak_llm": ("Princeton-SysML/Jailbreak_LLM", "1e490531c0ef4bc13430178bf1fbc8f813e34b1a",
                      "none stated"),
    "coconot": ("allenai/noncompliance", "25bf77cc668814360405cdb8197c4368205806c7", "MIT"),
    "judgebench": ("dmg-illc/JUDGE-BENCH", "5a0bf500325029efb5dc8adff2c1e991996f0e78",
                   "CC-BY-NC-4.0 (ToxicChat data)"),
    "alpaca_eval": ("tatsu-lab/alpaca_eval", "cd543a149df89434d8a54582c0151c0b945c3d20",
                    "CC-BY-NC-4.0 (data)"),
    "gsm8k": ("openai/grade-school-math", "3101c7d5072418e28b9008a6636bde82a006892c", "MIT"),
    "codealpaca": ("sahil280114/codealpaca", "2f78ddc5c682ed6738ad092bbbfa59ba915afcb0",
                   "CC-BY-NC-4.0"),
    "overkill": ("InvokerStark/OverKill", "9551a7ff7b2cb18d178e64fb5cc95e4684311b3b",
                 "none stated"),
}

# Source category names → the 8 harm categories (None: harmful, category unknown; the
# training script then takes the nearest bank category). "DROP" rows are left out: not harm
# in the gateway's sense (financial advice, partisan commentary) or outside the 8 categories.
CATQA = {
    "Drug:": "drugs", "Weapon:": "explosives_and_weapons", "Human Trafficking:": "fraud_and_crime",
    "Cybercrime:": "cyber_attacks", "Theft and Robbery:": "fraud_and_crime",
    "Content Sexual exploitation": "violence", "Physical abuse": "violence",
    "Emotional and psychological abuse": "hate_and_harassment", "Neglect": "violence",
    "Online predation": "violence",
    "Racial or ethnic hate": "hate_and_harassment", "Religious intolerance": "hate_and_harassment",
    "Gender-based violence": "violence", "Cyberbullying": "hate_and_harassment",
    "Terrorism and extremism": "violence",
    "Malicious software designed to spread and damage computers": "cyber_attacks",
    "Trojans": "cyber_attacks", "Spyware": "cyber_attacks", "Ransomware": "cyber_attacks",
    "Adware": "cyber_attacks",
    "Self-harm": "self_harm", "Assault and battery": "violence",
    "Hazardous material handling": "chemical_biological_weapons", "Unsafe practices": None,
    "Weapon making": "explosives_and_weapons",
    "Financial fraud": "fraud_and_crime", "Intellectual property theft": "fraud_and_crime",
    "Market manipulation": "fraud_and_crime", "Employment scams": "fraud_and_crime",
    "Investment scams": "fraud_and_crime",
    "Identity theft": "fraud_and_crime", "Phishing": "fraud_and_crime",
    "False advertising": "fraud_and_crime", "Scamming": "fraud_and_crime",
    "Counterfeiting": "fraud_and_crime",
    "Data theft": "cyber_attacks", "Surveillance": "fraud_and_crime", "Doxxing":
    "hate_and_harassment", "Deepfake creation": "fraud_and_crime",
    "Tracking and location monitoring": "fraud_and_crime",
}
CATQA_DROP_TOP = {"Adult Content", "Political Campaigning", "Tailored Financial Advice"}
AILUMINATE = {
    "cse": "violence", "dfm": "hate_and_harassment", "hte": "hate_and_harassment",
    "ipv": "fraud_and_crime", "iwp": None, "ncr": "fraud_and_crime", "prv": "fraud_and_crime",
    "src": "violence", "ssh": "self_harm", "vcr": "violence",
}  # sxc_prn (sexual content) and spc_* (specialised advice) are left out
SST = {
    "Suicide, Self-Harm, and Eating Disorders": "self_harm",
    "Physical harm and Violence": "violence",
    "Illegal and Highly Regulated items": None,
    "Scams and fraud": "fraud_and_crime",
    "Child safety": "violence",
}
COCONOT_UNSAFE = {
    "dangerous or sensitive topics": None, "privacy violations": "fraud_and_crime",
    "triggers for offensive language": "hate_and_harassment", "misinformation": None,
    "wildchats": None, "incomprehensible": None,
}  # copyright violations are left out (not harm here; they look like everyday requests)


def sentences(text: str) -> list[str]:
    """Sentences of 5+ words from a model-written answer (short benign statements: a model's
    answers are screened sentence-sized as well as whole, e.g. a completion)."""
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [p.strip() for p in parts if len(p.split()) >= 5 and not p.strip().startswith(
        ("```", "|", "#"))]


def norm(s: str) -> str:  # as ../shared/reserved/check.py
    return re.sub(r"[^a-z0-9]+", " ", s.lower()).strip()


def candidates(text: str) -> Iterator[str]:
    """The strings ../shared/reserved/check.py hashes in a file's text."""
    for line in text.splitlines():
        yield line
        for q in re.findall(r'"((?:[^"\\]|\\.){24,})"|\'((?:[^\'\\]|\\.){24,})\'', line):
            yield q[0] or q[1]
        yield from line.split(",")


class Mirror:
    """Pinned files of the mirrored repositories `repos` (key → repo, commit, licence),
    each read recorded in the manifest."""

    def __init__(self, root: Path, repos: dict[str, tuple[str, str, str]] | None = None) -> None:
        self.root = root
        self.repos = REPOS if repos is None else repos
        self.manifest: list[dict[str, object]] = []

    def read(self, key: str, path: str) -> bytes:
        repo, commit, licence = self.repos[key]
        git_dir = self.root / repo.replace("/", "+") / "repo"
        raw = subprocess.run(["git", "--git-dir", str(git_dir), "show", f"{commit}:{path}"],
                             check=True, capture_output=True).stdout
        self.manifest.append({"repo": repo, "commit": commit, "path": path, "licence": licence,
                              "sha256": hashlib.sha256(raw).hexdigest(), "rows_kept": 0})
        return raw

    def json(self, key: str, path: str) -> object:
        return json.loads(self.read(key, path))

    def jsonl(self, key: str, path: str) -> list[dict[str, object]]:
        return [json.loads(x) for x in self.read(key, path).decode().splitlines() if x.strip()]

    def csv(self, key: str, path: str) -> list[dict[str, str]]:
        return list(csv.DictReader(io.StringIO(self.read(key, path).decode("utf-8-sig"))))


Row = dict[str, object]


def collect(m: Mirror) -> list[tuple[int, Row]]:
    """(manifest index, row) for every candidate row, before filtering."""
    out: list[tuple[int, Row]] = []

    def add(text: object, label: str, source: str, category: str | None = None) -> None:
        if isinstance(text, str) and text.strip():
            out.append((len(m.manifest) - 1, {"text": text.strip(), "label": label,
                                               "source": source, "category": category}))
            if source.endswith(OUTPUT_SUFFIX):  # and its sentences, as short benign text
                for sentence in sentences(text):
                    out.append((len(m.manifest) - 1, {
                        "text": sentence, "label": label,
                        "source": source.replace(OUTPUT_SUFFIX, "_sentence" + OUTPUT_SUFFIX),
                        "category": category}))

    # ---- harmful requests
    harmfulqa = m.json("red-instruct", "harmful_questions/harmfulqa.json")
    assert isinstance(harmfulqa, dict)
    for topics in harmfulqa.values():
        for questions in topics.values():
            for q in questions:
                add(q, "harmful", "harmfulqa")
    catqa = m.json("red-instruct", "harmful_questions/catqa_english.json")
    assert isinstance(catqa, dict)
    for top, subs in catqa.items():
        if top in CATQA_DROP_TOP:
            continue
        for sub, questions in subs.items():
            for q in questions:
                add(q, "harmful", "catqa", CATQA[sub])
    dangerousqa = m.json("red-instruct", "harmful_questions/dangerousqa.json")
    assert isinstance(dangerousqa, list)
    for q in dangerousqa:
        add(q, "harmful", "dangerousqa")
    safety_only = m.json("stl", "data/training/safety_only_data_Instructions.json")
    assert isinstance(safety_only, list)
    for r in safety_only:
        text = r["instruction"] + ("\n" + r["input"] if r.get("input") else "")
        add(text, "harmful", "stl_safety_only")
        add(r["output"], "everyday", "stl_safety_only_output")  # refusals
    for name, category in (("I-MaliciousInstructions", None), ("I-CoNa", "hate_and_harassment"),
                           ("I-Controversial", "hate_and_harassment"),
                           ("I-PhysicalSafetyUnsafe", None)):
        data = m.json("stl", f"data/evaluation/{name}.json")
        assert isinstance(data, dict)
        for q in data["instructions"]:
            add(q, "harmful", "stl_" + name[2:].lower(), category)
    for r in m.csv("ailuminate", "airr_official_1.0_demo_en_us_prompt_set_release.csv"):
        if r["hazard"] in AILUMINATE:
            add(r["prompt_text"], "harmful", "ailuminate", AILUMINATE[r["hazard"]])
    for r in m.csv("sst", "SimpleSafetyTests - test cases.csv"):
        add(r["prompts_final"], "harmful", "simplesafetytests", SST[r["harm_area"]])
    for line in m.read("jailbreak_llm", "data/MaliciousInstruct.txt").decode().splitlines():
        add(line, "harmful", "maliciousinstruct")

    # ---- CoCoNot: safety-concern requests (harmful), their contrast set and the preference
    # set's safety prompts (borderline benign), the other categories (everyday)
    for r in m.jsonl("coconot", "data/coconot_eval.jsonl"):
        sub = str(r["subcategory"])
        if r["category"] == "Requests with safety concerns":
            if sub in COCONOT_UNSAFE:
                add(r["prompt"], "harmful", "coconot_unsafe", COCONOT_UNSAFE[sub])
        else:
            add(r["prompt"], "everyday", "coconot_nonsafety")
    for path in ("data/coconot_contrast_eval.jsonl", "data/coconot_pref.jsonl"):
        for r in m.jsonl("coconot", path):
            if r["category"] == "Requests with safety concerns":
                add(r["prompt"], "borderline", "coconot_contrast_safety")
            else:
                add(r["prompt"], "everyday", "coconot_nonsafety")
            if "chosen" in r:
                add(r["chosen"], "everyday", "coconot_output")

    # ---- ToxicChat, human-labelled: toxic (harmful) and non-toxic real user prompts (everyday)
    for split in ("train", "test"):
        data = m.json("judgebench", f"data/toxic_chat/toxic_chat_{split}.json")
        assert isinstance(data, dict)
        for inst in data["instances"]:
            toxic = inst["annotations"]["toxicity"]["majority_human"] == "1"
            add(inst["instance"], "harmful" if toxic else "everyday",
                "toxicchat_toxic" if toxic else "toxicchat_nontoxic")

    # ---- everyday
    alpaca = m.json("alpaca_eval", "example/outputs.json")
    assert isinstance(alpaca, list)
    for r in alpaca:
        # self-instruct rows are reserved; vicuna rows are the held-out Vicuna bench
        if r["dataset"] not in ("selfinstruct", "vicuna"):
            add(r["instruction"], "everyday", "alpaca_eval")
            add(r["output"], "everyday", "alpaca_eval_output")
    for bench in ("mt_bench", "vicuna_bench"):
        for r in m.jsonl("red-instruct", f"starling_training/fastchat/llm_judge/data/{bench}/"
                         "question.jsonl"):
            turns = r["turns"]
            assert isinstance(turns, list)
            add(turns[0], "everyday", bench)
    for r in m.jsonl("gsm8k", "grade_school_math/data/train.jsonl"):
        add(r["question"], "everyday", "gsm8k")
        add(r["answer"], "everyday", "gsm8k_output")
    code = m.json("codealpaca", "data/code_alpaca_2k.json")
    assert isinstance(code, list)
    for r in code:
        add(r["instruction"] + ("\n" + r["input"] if r.get("input") else ""), "everyday",
            "codealpaca")
        add(r["output"], "everyday", "codealpaca_output")

    # ---- the project's behaviour bank (policy/screening/banks/default.toml): harmful
    # descriptions with their category, and same-topic benign look-alikes (intent contrast)
    bank_path = ROOT / "policy" / "screening" / "banks" / "default.toml"
    raw = bank_path.read_bytes()
    m.manifest.append({"repo": "loragate (this repository)", "commit": None,
                       "path": "policy/screening/banks/default.toml", "licence": "Apache-2.0",
                       "sha256": hashlib.sha256(raw).hexdigest(), "rows_kept": 0})
    for entry in tomllib.loads(raw.decode())["category"]:
        name = entry["name"]
        for text in entry.get("harmful", []):
            add(text, "harmful", "loragate_bank", name if name in CATEGORIES else None)
        for text in entry.get("benign", []):
            add(text, "everyday" if name == "everyday" else "borderline",
                "loragate_bank_everyday" if name == "everyday" else "loragate_bank_lookalike")

    # ---- borderline benign
    safe = m.json("stl", "data/evaluation/I-PhysicalSafetySafe.json")
    assert isinstance(safe, dict)
    for q in safe["instructions"]:
        add(q, "borderline", "safetext_safe")
    for path in ("data/OKTest.csv", "data/OKTest_heldout.csv"):
        for r in m.csv("overkill", path):
            add(r["prompt"], "borderline", "oktest")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mirror", type=Path, default=Path("/work/.mirror"))
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    reserved = {x.strip() for x in RESERVED.read_text().splitlines()
                if x.strip() and not x.startswith("#")}
    mirror = Mirror(args.mirror)
    rows = collect(mirror)
    rng = random.Random(SEED)

    # caps on large everyday sources
    by_source: dict[str, list[tuple[int, Row]]] = defaultdict(list)
    for item in rows:
        by_source[str(item[1]["source"])].append(item)
    for source, cap in CAPS.items():
        if len(by_source[source]) > cap:
            by_source[source] = rng.sample(by_source[source], cap)
    rows = [item for source in sorted(by_source) for item in by_source[source]]

    def is_reserved(row: Row) -> bool:
        line = json.dumps(row, ensure_ascii=False)
        for c in (str(row["text"]), *candidates(str(row["text"])), *candidates(line)):
            n = norm(c)
            if hashlib.sha256(n.encode()).hexdigest() in reserved:
                return True
        return False

    dropped: Counter[str] = Counter()
    # exact duplicates (normalized): held-out sources win; a text under two labels is dropped
    labels: dict[str, set[str]] = defaultdict(set)
    for _, row in rows:
        labels[norm(str(row["text"]))].add(str(row["label"]))
    heldout_texts = {norm(str(r["text"])) for _, r in rows if r["source"] in HELDOUT}
    seen: set[str] = set()
    kept: list[tuple[int, Row]] = []
    for i, row in sorted(rows, key=lambda x: x[1]["source"] not in HELDOUT):
        n = norm(str(row["text"]))
        if len(n) < 3:
            dropped["empty"] += 1
        elif is_reserved(row):
            dropped["reserved"] += 1
        elif len(labels[n]) > 1:
            dropped["conflicting labels"] += 1
        elif n in seen:
            dropped["duplicate" + (" of held-out" if n in heldout_texts else "")] += 1
        else:
            seen.add(n)
            kept.append((i, row))

    # splits: whole held-out sources; the rest 80/20 per source
    per_source: dict[str, list[Row]] = defaultdict(list)
    for i, row in kept:
        per_source[str(row["source"])].append(row)
        mirror.manifest[i]["rows_kept"] = int(str(mirror.manifest[i]["rows_kept"])) + 1
    final: list[Row] = []
    for source in sorted(per_source):
        items = per_source[source]
        if source in HELDOUT:
            for row in items:
                row["split"] = "heldout"
        else:
            order = list(range(len(items)))
            rng.shuffle(order)
            n_val = round(len(items) * VAL_SHARE)
            for rank, j in enumerate(order):
                items[j]["split"] = "val" if rank < n_val else "train"
        final.extend(items)

    out = args.out / "corpus.jsonl.gz"
    body = "".join(json.dumps({k: r[k] for k in ("text", "label", "source", "category",
                                                 "split")}, ensure_ascii=False) + "\n"
                   for r in final).encode()
    with open(out, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0,
                                               filename="") as gz:
        gz.write(body)
    manifest = {
        "corpus": out.name,
        "corpus_sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "corpus_jsonl_sha256": hashlib.sha256(body).hexdigest(),
        "rows": len(final), "seed": SEED, "val_share": VAL_SHARE,
        "heldout_sources": sorted(HELDOUT), "caps": CAPS,
        "dropped": dict(sorted(dropped.items())),
        "reserved_filter": "SHA-256 of check.py-normalized text and candidates, "
                           "../shared/reserved/hashes.txt",
        "files": mirror.manifest,
    }
    (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    counts = Counter((str(r["source"]), str(r["label"]), str(r["split"])) for r in final)
    for key in sorted(counts):
        print(*key, counts[key], sep="\t")
    print("dropped:", dict(dropped), "rows:", len(final), "bytes:", out.stat().st_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
