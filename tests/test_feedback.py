"""Feedback anchoring outcomes and answer-leak sanitization, with hypothesis properties."""
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opcod.feedback import OUTCOMES, OutcomeCounts, anchor, normalize_word, sanitize

PROBLEM = ("What is the molar mass of calcium carbonate (CaCO3)? A: 100.09 g/mol B: 84.01 g/mol "
           "C: 56.08 g/mol D: 116.10 g/mol")


@pytest.mark.parametrize("feedback, outcome", [
    ("<concept>molar mass</concept> You forgot the three oxygen atoms.", "kept"),
    ("<concept>Carbonates</concept> Count the oxygens in the carbonate ion.", "kept"),  # plural
    ("<concept>CALCIUM</concept> Check calcium's atomic mass.", "kept"),                 # case
    ("<concept>entropy of mixing</concept> Consider disorder.", "no_match"),
    ("You forgot the oxygen atoms.", "no_concept_tag"),
    ("<concept>molar mass</concept>", "empty"),
    ("<concept>  </concept> Some critique.", "empty"),
    ("<concept>the formula of the question</concept> Look again.", "all_generic"),
    ("<concept>answer value</concept> Look again.", "all_generic"),
])
def test_anchor_outcomes(feedback, outcome):
    result = anchor(feedback, PROBLEM)
    assert result.outcome == outcome
    assert (result.text is not None) == (outcome == "kept")


def test_kept_text_is_sanitized_and_tag_free():
    result = anchor("<concept>molar mass</concept> Count oxygen three times. The answer is (A).", PROBLEM)
    assert result.outcome == "kept"
    assert "<concept>" not in result.text and "(A)" not in result.text
    assert result.text == "Count oxygen three times."


def test_normalize_word():
    assert [normalize_word(w) for w in ("Molecules", "densities", "classes", "gas", "mass")] == \
        ["molecule", "density", "class", "gas", "mass"]


@pytest.mark.parametrize("leaky, clean", [
    (r"So \boxed{B} is it.", "So is it."),
    (r"Thus \boxed{(C)}.", "Thus ."),
    (r"Thus \boxed{\text{D}}", "Thus"),
    ("Pick **B** here.", "Pick here."),
    ("Pick **(B)** here.", "Pick here."),
    ("Done. <answer>\nB\n</answer>", "Done."),
    ("Final answer: B", ""),
    ("The correct option is B.", ""),
    ("Hence the answer is (B).", "Hence"),
    ("I believe B is the correct answer.", "I believe"),
    ("The right choice would be C", ""),
])
def test_sanitize_removes_leaks(leaky, clean):
    assert sanitize(leaky) == clean


@pytest.mark.parametrize("text", [
    r"The mass is \boxed{100.09} g/mol.",
    "Option B confuses grams with moles.",
    "Compare options A and C: both ignore the subscript.",
    "An answer needs units.",
    "Bold **mass** matters.",
])
def test_sanitize_keeps_ordinary_text(text):
    assert sanitize(text) == text


letters = st.sampled_from("ABCDEFGHIJ")
filler = st.text(alphabet=st.characters(blacklist_characters="<>\\*{}", blacklist_categories=("Cs",)),
                 max_size=40)


@settings(max_examples=300, deadline=None)
@given(filler, letters, filler, st.sampled_from([
    r"\boxed{%s}", r"\boxed{(%s)}", r"\boxed{ %s }", "<answer>%s</answer>", "<answer>\n%s\n</answer>",
    "**%s**", "the answer is %s", "Final answer: (%s)", "<answer>%s"]))
def test_no_boxed_letter_or_answer_tag_survives(before, letter, after, leak):
    out = sanitize(before + (leak % letter) + after)
    assert not re.search(r"\\boxed\{\s*\(?\s*[A-J]\s*\)?\s*\}", out)
    assert "<answer>" not in out.lower() and "</answer>" not in out.lower()


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="<>\\*", blacklist_categories=("Cs",)), max_size=80))
def test_text_without_answer_patterns_is_unchanged(text):
    if re.search(r"(?i)\b(answer|option|choice)\b|\b[A-J]\)?\s+is\b", text):
        return  # could legitimately contain a phrase like "answer: B"
    assert sanitize(text) == text


def test_outcome_counts_merge():
    a, b = OutcomeCounts(), OutcomeCounts()
    a.add("kept", 3)
    b.add("kept")
    b.add("no_match", 2)
    total = a + b
    assert total.as_dict() == {"kept": 4, "no_match": 2, "no_concept_tag": 0, "empty": 0, "all_generic": 0}
    assert total.total() == 6 and set(total.as_dict()) == set(OUTCOMES)
    assert total.all_reduce().as_dict() == total.as_dict()  # no process group: unchanged
    with pytest.raises(ValueError, match="outcome"):
        a.add("maybe")
