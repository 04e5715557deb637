"""The Detoxify screen through the real `detoxify` loading path, offline, on a tiny
deterministic checkpoint built here: trigger words score high and clean text low; toxic
text beyond the model's truncation is still found (windows); a missing, unpinned or
tampered checkpoint is refused with a message naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from policy.digest import file_sha256
from policy.screening.harmful_requests import ScreenLoadError
from policy.screening.toxicity import ToxicityScreen, windows

CLASSES = ["toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack"]
TRIGGERS = {"idiot": [0, 4], "kill": [0, 3]}  # word → the classes it drives up


def build_trigger_checkpoint(out: Path) -> tuple[Path, Path]:
    """A 1-layer BERT whose CLS output is the mean token embedding, with hand-set weights:
    a trigger word lights up its classes (≈0.98), anything else stays ≈0.02."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    hf = out / "hf"
    hf.mkdir(parents=True)
    h = 8
    words = ["you", "are", "a", "nice", "kind", "the", "this", "is", "text", "good", "bad",
             "person", "hello", "world"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *TRIGGERS]
    (hf / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(hf / "vocab.txt"), do_lower_case=True,
                  model_max_length=128).save_pretrained(hf)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=h, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=8, max_position_embeddings=128,
                     num_labels=len(CLASSES))
    cfg.save_pretrained(hf)
    m = BertForSequenceClassification(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        layer = m.bert.encoder.layer[0]
        for ln in (m.bert.embeddings.LayerNorm, layer.attention.output.LayerNorm,
                   layer.output.LayerNorm):
            ln.weight.fill_(1.0)
        layer.attention.self.value.weight.copy_(torch.eye(h))
        layer.attention.output.dense.weight.copy_(torch.eye(h))
        m.bert.pooler.dense.weight.copy_(4 * torch.eye(h))
        m.classifier.bias.fill_(-4.0)
        for c in range(len(CLASSES)):
            m.classifier.weight[c, c] = 8.0
        for word, cls in TRIGGERS.items():
            for c in cls:
                m.bert.embeddings.word_embeddings.weight[vocab.index(word), c] = 1.0
    ckpt = out / "trigger.ckpt"
    torch.save({"config": {"arch": {"args": {"model_type": str(hf),
                                             "model_name": "BertForSequenceClassification",
                                             "tokenizer_name": "BertTokenizer",
                                             "num_classes": len(CLASSES)}},
                           "dataset": {"args": {"classes": CLASSES}}},
                "state_dict": m.state_dict()}, ckpt)
    return ckpt, hf


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_trigger_checkpoint(tmp_path_factory.mktemp("detoxify"))


@pytest.fixture(scope="module")
def screen(built):
    ckpt, hf = built
    return ToxicityScreen(ckpt, hf, sha256=file_sha256(ckpt))


def test_the_real_loader_scores_trigger_words_high_and_clean_text_low(screen):
    assert screen.categories[0] == "toxicity" and screen.version.startswith("detoxify-")
    clean, insult, threat = screen.score(["hello world", "you are an idiot", "I will kill you"])
    assert max(clean.values()) < 0.05
    assert insult["insult"] > 0.9 and insult["threat"] < 0.05
    assert threat["threat"] > 0.9


def test_toxic_words_past_the_truncation_point_are_still_found(screen):
    long_text = " ".join(["hello"] * 300 + ["idiot"])
    direct = screen.model.predict(long_text)  # Detoxify alone truncates at 128 tokens
    assert direct["insult"] < 0.05
    assert screen.score([long_text])[0]["insult"] > 0.9


def test_windows_overlap_and_cover_every_word():
    words = [f"w{i}" for i in range(250)]
    parts = windows(" ".join(words))
    covered = {w for p in parts for w in p.split()}
    assert covered == set(words) and len(parts) == 3
    assert windows("short text") == ["short text"]


def test_a_missing_unpinned_or_tampered_checkpoint_is_refused(built, tmp_path):
    ckpt, hf = built
    with pytest.raises(ScreenLoadError, match="not found"):
        ToxicityScreen(tmp_path / "missing.ckpt", hf, sha256="0" * 64)
    with pytest.raises(ScreenLoadError, match=r"lacks config\.json"):
        ToxicityScreen(ckpt, tmp_path, sha256=file_sha256(ckpt))
    with pytest.raises(ScreenLoadError, match="pin the SHA-256"):
        ToxicityScreen(ckpt, hf, sha256=None)
    with pytest.raises(ScreenLoadError, match="refusing to unpickle"):
        ToxicityScreen(ckpt, hf, sha256="0" * 64)
