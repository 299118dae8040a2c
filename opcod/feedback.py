"""Feedback anchoring: classify a tutor's critique by its <concept> tag and strip answer leaks."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

# The paper's five (Fig. 6, App. C.2), judged on the concept tag alone, then two of ours that split
# the paper's "kept": a critique with no words once the tag is removed, and one that sanitising
# emptied (their share measures how often the tutor just states an answer).
OUTCOMES = ("kept", "no_match", "no_concept_tag", "empty", "all_generic", "no_critique", "sanitized_empty")

STOP_WORDS = frozenset("""
a an the and or but nor of in on at to for from by with without into onto over under about as is are
was were be been being it its this that these those there here what which who whom whose how why
when where than then so such not no yes do does did done can could should would may might must will
shall i you he she we they me him her us them my your his our their one ones some any each every
all both either neither more most less least very just also only own same other another between
through during before after above below up down out off again further once if while because until
""".split())

GENERIC_WORDS = frozenset("""
concept concepts problem problems question questions answer answers equation equations formula
formulas formulae calculation calculations calculate value values option options choice choices
step steps method approach solution solutions result results number numbers quantity quantities
reasoning thing things idea ideas topic topics principle principles rule rules term terms
correct incorrect wrong right error errors mistake mistakes understanding knowledge information
given data unit units
""".split())

_CONCEPT = re.compile(r"<concept>(.*?)</concept>", re.DOTALL | re.IGNORECASE)
_WORD = re.compile(r"[A-Za-z0-9]+")


def normalize_word(word: str) -> str:
    """Lower case with simple plural folding (molecules -> molecule, densities -> density)."""
    w = word.lower()
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 4 and w.endswith(("sses", "shes", "ches", "xes", "zes")):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


def words(text: str) -> list[str]:
    return [normalize_word(w) for w in _WORD.findall(text)]


def _forms(word: str) -> set[str]:
    """A word's folded form and, for an -es plural, both readings (gases -> gas, cases -> case)."""
    w = word.lower()
    out = {normalize_word(w)}
    if len(w) > 4 and w.endswith("es"):
        out |= {w[:-1], w[:-2]}
    return {f for f in out if len(f) > 1}


def grounded(concept_word: str, problem_words: set[str]) -> bool:
    return bool(_forms(concept_word) & problem_words)


@dataclass(frozen=True)
class Anchored:
    outcome: str            # one of OUTCOMES
    text: str | None        # the sanitized critique when kept, else None
    concept: str | None = None


def anchor(feedback: str, problem_text: str, *, answer: str | None = None,
           options: list[tuple[str, str]] | None = None) -> Anchored:
    """Keep feedback only if its <concept> names a non-generic word of the problem (SPEC section 4)
    and a critique with words survives sanitising (answer-blind: `answer` is not read). The concept
    is judged first, as the paper does (no_concept_tag, empty, all_generic, no_match); a grounded
    concept with no critique is `no_critique`, one whose critique sanitising empties is
    `sanitized_empty`."""
    match = _CONCEPT.search(feedback)
    if match is None:
        return Anchored("no_concept_tag", None)
    concept = match.group(1).strip()
    concept_words = _WORD.findall(concept)
    if not concept_words:
        return Anchored("empty", None, concept or None)
    # A one-character word or a bare number does not ground a concept in the question.
    specific = [w for w in concept_words if normalize_word(w) not in STOP_WORDS
                and normalize_word(w) not in GENERIC_WORDS and len(w) > 1 and not w.isdigit()]
    if not specific:
        return Anchored("all_generic", None, concept)
    problem_words = {f for w in _WORD.findall(problem_text) for f in _forms(w)}
    if not any(grounded(w, problem_words) for w in specific):
        return Anchored("no_match", None, concept)
    critique = _CONCEPT.sub(" ", feedback).strip()
    if not _has_words(critique):
        return Anchored("no_critique", None, concept)
    text = sanitize(critique, answer=answer, options=options)
    if not _has_words(text):
        return Anchored("sanitized_empty", None, concept)
    return Anchored("kept", text, concept)


def _has_words(text: str) -> bool:
    return bool(re.search(r"[A-Za-z]{2,}|\d", text))


# ----------------------------------------------------------------------------- answer leaks
# Sanitising is answer-blind (SPEC section 4): every phrasing below is applied to every option letter
# and to every option's text alike, so whether a statement goes never depends on which option is
# right. A filter that removed only statements of the gold option would leave the teacher's context
# with claims of wrong options more often than of the right one: feedback biased towards misleading.
# Option letters are capitals: "a" the article, or "a function of T", is never option A.
_L = r"(?-i:[A-J])"
_QUOTE = "'\"\u2018\u2019\u201c\u201d`"
_OPEN = rf"[(\[{_QUOTE}]{{0,2}}"
_CLOSE = rf"[)\]{_QUOTE}]{{0,2}}"
_END = r"(?![\w-])"  # not "B-field", "B12", "Bs"
# Where a bare statement must stop to count as a final answer: the end of a sentence or a line.
# "So it must be B." goes; "so B decreases" and "Thus A, B and C are..." stay.
_SENTENCE_END = r"[ \t]*(?:[.!](?=\s|$)|(?=\n)|$)"
_NOUN = r"(?:answer|option|choice|pick)"
_JUDGED = r"(?:final|correct|right|best|true|only|actual|intended|proper)"
_ADVERB = (r"(?:therefore|thus|then|hence|clearly|definitely|probably|simply|actually|really|indeed|obviously|"
           r"certainly|surely|likely|most\s+likely|in\s+fact|just)")
_BE = r"(?:is|was|will\s+be|would\s+be|should\s+be|must\s+be|has\s+to\s+be|can\s+only\s+be|'s)"


def _stated(what: str) -> list[re.Pattern]:
    """Phrases that state `what` (the letter class, or one option's text) as the final answer."""
    thing = rf"(?:(?:option|choice|answer|letter)\s+)?{_OPEN}\s*{what}\s*{_CLOSE}{_END}"
    flags = re.IGNORECASE | re.MULTILINE
    return [
        # "the (final/correct) answer (here) is (actually) X", "Final answer - B", "answer: (B)",
        # "Hence the correct response is B" (response/letter/selection only with a judging word)
        re.compile(rf"\b(?:the\s+|my\s+|our\s+)?(?:(?:{_JUDGED}\s+)?{_NOUN}|{_JUDGED}\s+(?:response|letter|selection))"
                   rf"(?:\s+(?:here|then|therefore|thus|hence))?\s*(?:{_BE}(?:\s*,?\s*{_ADVERB},?)?|[:=\-\u2013\u2014])"
                   rf"\s*{thing}[.!]?", flags),
        # "B is the correct answer", "option B is right", "Option B is the answer."
        re.compile(rf"{thing}\s+(?:is|would\s+be|must\s+be)\s+(?:(?:the\s+)?(?:{_JUDGED})(?:\s+(?:answer|option|choice|"
                   rf"one|response))?\b|(?:the|my|our)\s+(?:final\s+)?answer\b)[.!]?", flags),
        # a conclusion: "Therefore, D.", "So it's B.", "So it must be B.", "Hence we pick C."
        re.compile(rf"\b(?:therefore|thus|hence|so|overall|in\s+conclusion|consequently)\s*[,:]?\s*(?:(?:it(?:'s|\s+is)|"
                   rf"it\s+(?:must|should|has\s+to|would|will|can\s+only)\s+be|we\s+(?:get|have|pick|choose))\s+)?"
                   rf"{thing}{_SENTENCE_END}", flags),
        # "It's B.", "It must be option C." ending a sentence
        re.compile(rf"\bit(?:'s|\s+is|\s+(?:must|should|has\s+to|would|will|can\s+only)\s+be)\s+(?:{_ADVERB}\s+)?"
                   rf"{thing}{_SENTENCE_END}", flags),
        # choosing it: "pick B", "go with option C", "you should have chosen B" (not "you chose B",
        # which reports the tutee's own answer)
        re.compile(rf"\b(?:(?:should|would|could|must)(?:\s+have|'ve)\s+(?:chosen|picked|selected|gone\s+with|"
                   rf"opted\s+for|circled|answered)|choose|pick|select|go\s+with|opt\s+for|circle|answer\s+with|"
                   rf"respond\s+with)\s+{thing}[.!]?", flags),
        # "I would say B.", "I'd go with C", "we answer D"
        re.compile(rf"\b(?:I|we)(?:\s+would|'d|\s+will|'ll|\s+should)?\s+(?:say|guess|answer|go\s+with|pick|choose|"
                   rf"select|opt\s+for)\s+{thing}{_SENTENCE_END}", flags),
        # a line that is nothing but the choice
        re.compile(rf"^[ \t]*{thing}[ \t]*[.!]?[ \t]*$", flags),
    ]


_GENERIC_LEAKS = [re.compile(r"<answer>.*?</answer>", re.DOTALL | re.IGNORECASE),
                  re.compile(rf"</?answer>(?:\s*{_L}{_END})?", re.IGNORECASE),
                  # "the correct option is the one saying it increases": the answer by description
                  re.compile(rf"\b(?:the\s+)?(?:{_JUDGED}\s+)?{_NOUN}\s+{_BE}\s+(?:{_ADVERB}\s+)?the\s+one\s+"
                             rf"(?:that|which|saying|stating|with|where|claiming|about|in\s+which)\b[^.!?\n]*[.!?]?",
                             re.IGNORECASE),
                  # a lead-in left with nothing after it once its answer went: "Final answer: **C**"
                  re.compile(rf"\b(?:the\s+|my\s+|our\s+)?(?:{_JUDGED}\s+)?{_NOUN}\s*(?:{_BE}|[:=\-\u2013\u2014])"
                             rf"[ \t]*[.!]?[ \t]*(?=\n|$)", re.IGNORECASE)] + _stated(_L)
_BOXED = re.compile(r"\\boxed\s*\{((?:[^{}]|\{[^{}]*\})*)\}")
_BOLD = re.compile(r"\*\*([^*\n]+?)\*\*")
_LABEL_ONLY = re.compile(rf"^(?:(?:option|choice|answer)\s*)?{_OPEN}\s*{_L}\s*(?:[)\]{_QUOTE}.:]|$)", re.IGNORECASE)


def _plain(tex: str) -> str:
    """A boxed or bolded span without TeX wrappers, quotes and the words option/choice."""
    t = re.sub(r"\\(?:text|mathrm|mathbf|textbf|mathit|textit|operatorname)\s*\{([^{}]*)\}", r"\1", tex)
    t = re.sub(r"(?i)\b(?:option|choice|answer)\b", "", t)
    return t.strip().strip(_QUOTE + "()[]{}.:").strip()


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


@functools.lru_cache(maxsize=4096)
def _option_patterns(texts: tuple[str, ...]) -> tuple[re.Pattern, ...]:
    """_stated for every option text (longer than one character, any whitespace between its words)."""
    out = []
    for t in texts:
        out += _stated(r"\s+".join(map(re.escape, t.split())))
    return tuple(out)


def sanitize(text: str, *, answer: str | None = None, options: list[tuple[str, str]] | None = None) -> str:
    """Remove every statement of an option as the final answer, whichever option it names: boxed or
    bold letters, <answer> tags, "the answer is (B)", "Final answer - B", "Therefore, D.", "I would
    say B.", "you should have chosen B", "the correct option is the one saying ..."; with `options`
    (label, text), also any option's text given as the answer ("the answer is 3.2 eV", "**3.2 eV**",
    "\\boxed{3.2 eV}"). Numeric boxed values that are no option's text and ordinary mentions of
    options ("option B assumes...", "you chose B") stay. `answer`, the gold label, is accepted and
    not read: what goes never depends on which option is right (SPEC section 4). Unchanged if
    nothing leaks."""
    del answer  # answer-blind by construction
    texts = tuple(sorted({_squash(t) for _, t in options or () if len(_squash(t)) > 1}))
    patterns = list(_GENERIC_LEAKS) + list(_option_patterns(texts))

    def is_option_text(span: str) -> bool:
        return _squash(span) in texts

    def boxed(m):
        inner = _plain(m.group(1))
        return "" if re.fullmatch(_L, inner) or is_option_text(inner) else m.group(0)

    def bold(m):
        inner = m.group(1).strip()
        return "" if _LABEL_ONLY.match(inner) or is_option_text(_plain(inner)) else m.group(0)

    out = text
    for _ in range(10):  # removals can join text into a new leak; repeat to a fixed point
        before = out
        out = _BOXED.sub(boxed, out)
        out = _BOLD.sub(bold, out)
        for pattern in patterns:
            out = pattern.sub("", out)
        if out == before:
            break
    if out == text:
        return text
    return re.sub(r"[ \t]{2,}", " ", out).strip()


def names_letter(text: str, letter: str) -> bool:
    """Whether `text` still names option `letter` as a word (the leak-rate diagnostic)."""
    return bool(re.search(rf"(?<![\w-]){re.escape(letter)}(?![\w-])", text))


@dataclass
class OutcomeCounts:
    """Counts of anchoring outcomes; add them across steps, all-reduce them across ranks."""
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))

    @classmethod
    def of(cls, counts: dict[str, int]) -> "OutcomeCounts":
        """Counts read back from a checkpoint or summary; outcomes it predates count 0."""
        unknown = set(counts) - set(OUTCOMES)
        if unknown:
            raise ValueError(f"unknown anchoring outcome(s) {sorted(unknown)}; expected one of {OUTCOMES}")
        return cls({o: int(counts.get(o, 0)) for o in OUTCOMES})

    def add(self, outcome: str, n: int = 1) -> None:
        if outcome not in self.counts:
            raise ValueError(f"unknown anchoring outcome {outcome!r}; expected one of {OUTCOMES}")
        self.counts[outcome] += n

    def __add__(self, other: "OutcomeCounts") -> "OutcomeCounts":
        return OutcomeCounts({k: self.counts[k] + other.counts[k] for k in OUTCOMES})

    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def all_reduce(self, group=None) -> "OutcomeCounts":
        """The sum over all ranks (a no-op without an initialised process group)."""
        import torch
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            return OutcomeCounts(self.as_dict())
        t = torch.tensor([self.counts[k] for k in OUTCOMES], dtype=torch.int64)
        dist.all_reduce(t, group=group)
        return OutcomeCounts(dict(zip(OUTCOMES, t.tolist())))
