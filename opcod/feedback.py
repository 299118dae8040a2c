"""Feedback anchoring: classify a tutor's critique by its <concept> tag and strip answer leaks."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

OUTCOMES = ("kept", "no_match", "no_concept_tag", "empty", "all_generic")

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


@dataclass(frozen=True)
class Anchored:
    outcome: str            # one of OUTCOMES
    text: str | None        # the sanitized critique when kept, else None
    concept: str | None = None


def anchor(feedback: str, problem_text: str) -> Anchored:
    """Keep feedback only if its <concept> names a non-generic word of the problem (SPEC section 4)."""
    match = _CONCEPT.search(feedback)
    if match is None:
        return Anchored("no_concept_tag", None)
    concept = match.group(1).strip()
    critique = _CONCEPT.sub(" ", feedback).strip()
    concept_words = words(concept)
    if not concept_words or not critique:
        return Anchored("empty", None, concept or None)
    specific = [w for w in concept_words if w not in STOP_WORDS and w not in GENERIC_WORDS]
    if not specific:
        return Anchored("all_generic", None, concept)
    if not set(specific) & set(words(problem_text)):
        return Anchored("no_match", None, concept)
    return Anchored("kept", sanitize(critique), concept)


_L = r"[A-J]"
_LEAKS = [
    re.compile(r"<answer>.*?</answer>", re.DOTALL | re.IGNORECASE),
    re.compile(rf"</?answer>(?:\s*{_L}\b)?", re.IGNORECASE),
    re.compile(rf"\\boxed\{{\s*(?:\\text(?:bf)?\{{\s*)?\(?\s*{_L}\s*\)?\s*\}}?\s*\}}"),
    re.compile(rf"\*\*\s*\(?\s*{_L}\s*\)?\s*[.:]?\s*\*\*"),
    re.compile(rf"\b(?:the\s+)?(?:final\s+|correct\s+|right\s+|best\s+)?(?:answer|option|choice)"
               rf"\s*(?:is|:|=|would\s+be|should\s+be|must\s+be)\s*(?:option\s+|choice\s+)?"
               rf"\(?\s*\**\s*{_L}\s*\**\s*\)?(?![\w])\.?", re.IGNORECASE),
    re.compile(rf"\b(?:option\s+|choice\s+)?\(?{_L}\)?\s+is\s+(?:the\s+)?(?:correct|right)"
               rf"(?:\s+(?:answer|option|choice))?\b\.?", re.IGNORECASE),
]


def sanitize(text: str) -> str:
    """Remove stated answers (boxed or bold letters, <answer> tags, "the answer is (B)" ...);
    numeric boxed values and ordinary mentions of options stay. Unchanged if nothing leaks."""
    out = text
    for _ in range(10):  # removals can join text into a new leak; repeat to a fixed point
        before = out
        for pattern in _LEAKS:
            out = pattern.sub("", out)
        if out == before:
            break
    if out == text:
        return text
    return re.sub(r"[ \t]{2,}", " ", out).strip()


@dataclass
class OutcomeCounts:
    """Counts of anchoring outcomes; add them across steps, all-reduce them across ranks."""
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))

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
