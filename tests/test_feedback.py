"""Feedback anchoring outcomes and answer-leak sanitization, with hypothesis properties."""
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opcod.feedback import OUTCOMES, OutcomeCounts, anchor, names_letter, normalize_word, sanitize

PROBLEM = ("What is the molar mass of calcium carbonate (CaCO3)? A: 100.09 g/mol B: 84.01 g/mol "
           "C: 56.08 g/mol D: 116.10 g/mol")


@pytest.mark.parametrize("feedback, outcome", [
    ("<concept>molar mass</concept> You forgot the three oxygen atoms.", "kept"),
    ("<concept>Carbonates</concept> Count the oxygens in the carbonate ion.", "kept"),  # plural
    ("<concept>CALCIUM</concept> Check calcium's atomic mass.", "kept"),                 # case
    ("<concept>entropy of mixing</concept> Consider disorder.", "no_match"),
    ("You forgot the oxygen atoms.", "no_concept_tag"),
    ("<concept>molar mass</concept>", "no_critique"),
    ("<concept>molar mass</concept> ... !", "no_critique"),
    ("<concept>  </concept> Some critique.", "empty"),
    ("<concept></concept>", "empty"),
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
    if re.search(r"(?i)\b(answer|option|choice|pick|choose|select|circle|opt|therefore|thus|hence|so|overall|"
                 r"conclusion)\b|\b[A-J]\)?\s+is\b", text) or re.search(r"(?m)^\W*[A-J]\W*$", text):
        return  # could legitimately contain a phrase like "answer: B" or a line "B."
    assert sanitize(text) == text


def test_outcome_counts_merge():
    a, b = OutcomeCounts(), OutcomeCounts()
    a.add("kept", 3)
    b.add("kept")
    b.add("no_match", 2)
    total = a + b
    assert total.as_dict() == {"kept": 4, "no_match": 2, "no_concept_tag": 0, "empty": 0, "all_generic": 0,
                               "no_critique": 0, "sanitized_empty": 0}
    assert total.total() == 6 and set(total.as_dict()) == set(OUTCOMES)
    # Counts saved before the two newer outcomes existed read back with them at 0.
    old = {"kept": 4, "no_match": 2, "no_concept_tag": 1, "empty": 3, "all_generic": 0}
    assert OutcomeCounts.of(old).as_dict() == {**old, "no_critique": 0, "sanitized_empty": 0}
    with pytest.raises(ValueError, match="outcome"):
        OutcomeCounts.of({"maybe": 1})
    assert total.all_reduce().as_dict() == total.as_dict()  # no process group: unchanged
    with pytest.raises(ValueError, match="outcome"):
        a.add("maybe")


# ----------------------------------------------------------------------------- leaks that got through

@pytest.mark.parametrize("leaky", [
    r"\boxed{\mathrm{B}}", r"\boxed{\text{Option B}}", "**Option B**", "**B) 3.2 eV**", "Final answer - B",
    "the correct choice here is B", "The correct answer is therefore B.", "The answer is 'B'", "Therefore, D.",
    "So the answer would be (C).", "Pick option A.", "In conclusion, it's B.",
])
def test_phrasings_that_passed_through_are_removed(leaky):
    out = sanitize(f"Recheck the units first. {leaky}\nThen compare.")
    assert not re.search(r"(?<![\w-])[A-J](?![\w-])", out), out
    assert out.startswith("Recheck the units first.") and out.endswith("Then compare.")


@pytest.mark.parametrize("text", [
    "The answer is a function of temperature.",  # the article, not option A
    "A larger gap needs more energy.", "So B is more stable than A.", "Option B assumes constant pressure.",
    "Use the B-field here.", "Vitamin B12 matters.",
])
def test_letters_in_ordinary_sentences_stay(text):
    assert sanitize(text) == text
    assert sanitize(text, answer="B", options=[("A", "1 eV"), ("B", "3.2 eV")]) == text


OPTIONS = [("A", "1.1 eV"), ("B", "3.2 eV"), ("C", "it increases"), ("D", "it stays zero")]

# Answer statements as tutors write them, collected from the audit of issue 31 and from reading
# tutor outputs; written independently of the sanitiser's patterns (not generated from them), so a
# phrasing the patterns miss shows up here. {x} is an option letter.
STATEMENTS = [
    "The answer is {x}.", "the answer should be {x}", "The correct answer is actually {x}.",
    "So the answer would be ({x}).", "Final answer: {x}", "Final Answer: **{x}**", "Answer: {x}",
    "The right choice is {x}.", "The best option here is {x}.", "Option {x} is the answer.",
    "{x} is the correct option.", "Option {x} is correct.", "({x}) is right.", "'{x}' is the right one.",
    "I would say {x}.", "I'd say {x}.", "I'd go with {x}.", "I think it's {x}.", "My answer: {x}",
    "My pick is {x}.", "Hence the correct response is {x}.", "you should have chosen {x}",
    "You should have picked option {x}.", "You should pick {x}.", "Choose {x}.", "Go with {x} instead.",
    "Select option {x}.", "the correct option is actually {x}", "So it must be {x}.", "Therefore, {x}.",
    "Thus the answer is {x}.", "It has to be {x}.", "It's clearly {x}.", "So, it's {x}.", "In conclusion, {x}.",
    "The correct letter is {x}.", "The intended answer is {x}.", "Correct option: ({x})", "\\boxed{{{x}}}",
    "**{x}**", "**Option {x}**", "<answer>{x}</answer>", "{x}", "The answer is option {x}.", "Answer - {x}",
    "the answer is [{x}]", "Clearly, the answer is {x}.", "Therefore the correct choice is {x}.",
    "It should be {x}.", "It must be option {x}.", "We pick {x}.", "The answer must be {x}!",
    "So the final answer is {x}", "Thus, {x}.", "Overall: {x}.",
]
# Ordinary mentions of options inside explanations (paper App. C.2 keeps them).
MENTIONS = [
    "Option {x} assumes constant pressure.", "You chose {x}, but the units are off.",
    "Compare options {x} and A: both ignore the subscript.", "So {x} is more stable than the others.",
    "Why is {x} wrong here?", "It is {x} that has more electrons.", "Thus {x}, A and C all ignore the charge.",
    "If you picked {x} because of the sign, recheck it.", "The value in option {x} is off by a factor of ten.",
]
# An option's text given as the answer, or described as the answer; {t} is an option's text.
TEXT_STATEMENTS = ["The answer is {t}.", "Final answer: {t}", "**{t}**", "\\boxed{{{t}}}", "Therefore, {t}.",
                   "the correct choice is {t}", "{t} is the correct answer.",
                   "So the correct option is the one saying {t}."]
NAMES = {"A": "1.1 eV", "B": "3.2 eV", "C": "it increases", "D": "it stays zero"}


def _removed(out: str, x: str) -> bool:
    return not names_letter(out, x)


@pytest.mark.parametrize("template", STATEMENTS)
def test_every_statement_of_any_option_goes_whichever_option_is_right(template):
    """Each phrasing, for every letter and every gold label (and none): the statement goes and the
    text around it stays. Guards against removal that depends on the gold label (it removed
    "It is option B." with gold B but kept "It is option C.") and against the audit's misses
    ("Option B is the answer.", "I would say B.", "you should have chosen B", ...)."""
    for x in "ABCD":
        for gold in (None, "A", "B", "C", "D"):
            out = sanitize(f"Recheck the units.\n{template.format(x=x)}\nThen redo it.", answer=gold, options=OPTIONS)
            assert _removed(out, x), (template, x, gold, out)
            assert out.startswith("Recheck the units.") and out.endswith("Then redo it."), out


@pytest.mark.parametrize("template", MENTIONS)
def test_ordinary_mentions_stay_whichever_option_is_right(template):
    for x in "BCD":
        text = template.format(x=x)
        for gold in (None, "A", "B", "C", "D"):
            assert sanitize(text, answer=gold, options=OPTIONS) == text


calm = st.text(alphabet="abcdefghklmnpqrtuvwxyz ,;0123456789", max_size=30)


@settings(max_examples=400, deadline=None)
@given(calm, st.sampled_from(STATEMENTS + MENTIONS), calm, st.sampled_from("ABCD"))
def test_sanitising_is_answer_blind(before, template, after, x):
    """The property of SPEC section 4: for every phrasing and option letter, the output is the same
    whether or not that letter (or any other) is the gold one, and a phrasing is removed for every
    letter or for none. Guards against any gold-dependent pattern (the old `it's <gold>` rule and
    the gold-text rules)."""
    text = f"{before}\n{template.format(x=x)}\n{after}"
    outs = {sanitize(text, answer=gold, options=OPTIONS) for gold in (None, "A", "B", "C", "D")}
    assert len(outs) == 1, outs
    removed = {_removed(sanitize(f"{before}\n{template.format(x=y)}\n{after}", options=OPTIONS), y) for y in "ABCD"}
    assert len(removed) == 1, (template, removed)


@pytest.mark.parametrize("template", TEXT_STATEMENTS)
def test_any_options_text_given_as_the_answer_goes_whichever_is_right(template):
    """"The answer is it increases." goes like "The answer is it stays zero.", and \\boxed{1.1 eV}
    like \\boxed{3.2 eV}, whatever the gold label. Guards against removing only the gold option's
    text (the old rule: the gold value went, a wrong one stayed)."""
    for label, text in OPTIONS:
        for gold in (None, "A", "B", "C", "D"):
            out = sanitize(f"Recheck the units.\n{template.format(t=text)}\nThen redo it.", answer=gold,
                           options=OPTIONS)
            assert text.lower() not in out.lower(), (template, label, gold, out)
            assert out.startswith("Recheck the units.") and out.endswith("Then redo it."), out


@pytest.mark.parametrize("x", "ABCD")
def test_no_answer_lead_in_is_left_dangling(x):
    """Once the letter goes, its lead-in goes too: "Final answer:" alone is no critique. Guards
    against a kept critique that is only the stub of an answer statement."""
    for leak in (f"Final answer: **{x}**", f"The correct answer is \\boxed{{{x}}}", f"Final answer:\n{x}"):
        assert sanitize(f"Recheck the units.\n{leak}\nThen redo it.") == "Recheck the units.\n\nThen redo it."


def test_an_options_text_in_an_explanation_stays():
    for text in ("3.2 eV would need a larger band gap than this material has.",
                 "1.1 eV would need a smaller band gap than this material has.", r"The gap is \boxed{2.0} eV."):
        for gold in (None, "A", "B"):
            assert sanitize(text, answer=gold, options=OPTIONS) == text


def test_anchor_grounding_and_emptiness():
    problem = "Which law describes ideal gases at constant temperature? A: Boyle B: Charles"
    assert anchor("<concept>gas</concept> Think of pressure.", problem).outcome == "kept"
    assert anchor("<concept>gases</concept> Think of pressure.", "Which gas law applies?").outcome == "kept"
    assert anchor("<concept>cases</concept> Think.", "In which case does it hold?").outcome == "kept"
    # One letter or a bare number does not ground a concept, even if it "appears" in the question.
    assert anchor("<concept>A</concept> Think of pressure.", problem).outcome == "all_generic"
    assert anchor("<concept>12</concept> Think.", "What is 12 squared?").outcome == "all_generic"
    # Nothing left once the answer statement is removed: its own outcome, not kept with text ''.
    result = anchor("<concept>ideal gases</concept> The answer is B.", problem, answer="B",
                    options=[("A", "Boyle"), ("B", "Charles")])
    assert result.outcome == "sanitized_empty" and result.text is None


@pytest.mark.parametrize("feedback, outcome", [
    ("<concept></concept> Count the oxygens.", "empty"),                 # the paper's empty: the tag
    ("<concept> ? </concept> Count the oxygens.", "empty"),
    ("<concept>molar mass</concept>", "no_critique"),                     # a grounded tag, no critique
    ("<concept>molar mass</concept>\n  -- ", "no_critique"),
    ("<concept>molar mass</concept> The answer is (A).", "sanitized_empty"),   # only an answer statement
    ("<concept>molar mass</concept> Final answer: **C**", "sanitized_empty"),
    ("<concept>molar mass</concept> \\boxed{D}. Final answer: D", "sanitized_empty"),
    # the concept is judged first, as the paper does, whatever the critique holds
    ("<concept>the question</concept>", "all_generic"),
    ("<concept>entropy</concept> The answer is (A).", "no_match"),
])
def test_empty_tag_wordless_critique_and_sanitised_away_are_three_outcomes(feedback, outcome):
    """The paper's `empty` is an empty concept tag only; a critique with no words and one that
    sanitising empties get outcomes of their own. Guards against folding them into `empty`
    (Fig. 6's shares shift) or into `kept` with an empty text."""
    result = anchor(feedback, PROBLEM, answer="A", options=[("A", "100.09 g/mol"), ("B", "84.01 g/mol")])
    assert result.outcome == outcome and result.text is None
