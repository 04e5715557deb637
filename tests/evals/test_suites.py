"""Suite files: the shipped restricted-knowledge probe follows its schema, its hash
names its exact bytes, and malformed files are refused saying where."""

from __future__ import annotations

import pytest

from evals.suites import SUITES_DIR, SuiteError, load_multiple_choice, load_suite

SHIPPED = SUITES_DIR / "restricted_knowledge.toml"


def test_the_shipped_restricted_knowledge_probe_is_well_formed():
    suite = load_multiple_choice(SHIPPED)
    assert suite.name == "restricted_knowledge" and len(suite.items) == 20
    assert len(suite.canaries) == 3 and len(suite.facts()) == 20
    for item in suite.items:  # each fact states the true answer and no other choice
        fact = item.fact.lower()
        assert item.choices[item.answer].lower() in fact
        assert not any(c.lower() in fact for i, c in enumerate(item.choices) if i != item.answer)
    assert len({i.answer for i in suite.items}) == 4  # the true answer is not always one slot


def test_the_hash_changes_with_any_byte(tmp_path):
    copy = tmp_path / "copy.toml"
    copy.write_bytes(SHIPPED.read_bytes())
    assert load_multiple_choice(copy).sha256 == load_multiple_choice(SHIPPED).sha256
    copy.write_bytes(SHIPPED.read_bytes().replace(b"347 degrees", b"348 degrees"))
    assert load_multiple_choice(copy).sha256 != load_multiple_choice(SHIPPED).sha256


GOOD = '''[suite]
name = "lab"
kind = "multiple_choice"
[[item]]
question = "Q?"
choices = ["a", "b", "c", "d"]
answer = 1
'''


@pytest.mark.parametrize("text, message", [
    (GOOD.replace('kind = "multiple_choice"', 'kind = "essay"'), "kind"),
    (GOOD.replace('answer = 1', 'answer = 4'), "index"),
    (GOOD.replace('answer = 1', 'answer = true'), "index"),
    (GOOD.replace('["a", "b", "c", "d"]', '["a", "b", "c"]'), "4 distinct"),
    (GOOD.replace('["a", "b", "c", "d"]', '["a", "a", "c", "d"]'), "4 distinct"),
    (GOOD.replace('question = "Q?"', 'question = ""'), "question"),
    (GOOD + '[canaries]\nstrings = ["x", "x"]\n', "canaries"),
    ("[suite]\nname = \"x\"\nkind = \"multiple_choice\"\n", "at least one"),
    ("not toml [", "not valid TOML"),
])
def test_malformed_suites_are_refused_saying_where(tmp_path, text, message):
    path = tmp_path / "suite.toml"
    path.write_text(text)
    with pytest.raises(SuiteError, match=message):
        load_multiple_choice(path)


SHIFT = """[suite]
name = "cs"
kind = "compliance_shift"
[openers]
refusal = ["No."]
compliance = ["Sure,"]
[[item]]
category = "c"
prompt = "Harmful one?"
control = "Benign one?"
[[item]]
category = "c"
prompt = "Harmful two?"
control = "Benign two?"
"""


def test_the_shipped_compliance_shift_pairs_every_request_with_a_look_alike():
    suite = load_suite(SUITES_DIR / "compliance_shift.toml")
    assert all(item.control for item in suite.items)
    assert len({item.control for item in suite.items}) == len(suite.items)


@pytest.mark.parametrize("text, message", [
    (SHIFT.replace('control = "Benign two?"\n', ""), "every item has a control or none"),
    (SHIFT.replace('"Benign two?"', '"Benign one?"'), "distinct"),
    (SHIFT.replace('"Benign two?"', '"Harmful one?"'), "differ from every prompt"),
    (SHIFT.replace('"Benign two?"', '""'), "control must be non-empty"),
    (SHIFT.replace('"Benign two?"', "3"), "control must be non-empty"),
])
def test_malformed_controls_are_refused_saying_where(tmp_path, text, message):
    path = tmp_path / "suite.toml"
    path.write_text(text)
    with pytest.raises(SuiteError, match=message):
        load_suite(path)


def test_only_compliance_shift_items_take_a_control(tmp_path):
    path = tmp_path / "suite.toml"
    path.write_text('[suite]\nname = "g"\nkind = "generation"\n'
                    '[[item]]\nprompt = "Hi?"\ncontrol = "Hello?"\n')
    with pytest.raises(SuiteError, match="only compliance_shift"):
        load_suite(path)
