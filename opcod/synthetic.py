"""Seeded synthetic science MCQs (chemistry and physics roles) with worked solutions and feedback.

Every family is a classification over four fixed classes, listed as the options in one fixed
order (as in "Which group ...? A: alkali metals B: alkaline earth metals ..."), so the letter
follows from knowing the class. We measured that a tiny model trained for minutes on a CPU does
not learn to find a recalled text among shuffled options (the letter stayed at chance in every
format tried), while it does learn finite facts; fixed options keep the demo about knowledge.

Each item is asked from several directions (name -> group, symbol -> group, name -> ion charge),
and each worked solution first states a hint (a group number, base units, what a field is about)
and then the class it implies, without naming the item ("It is in group 17, the halogens."):
copying a many-token name out of the question was where the tiny model failed most. The tutor
critiques give that hint, never the class itself, so useful feedback is knowledge the tutee
lacks rather than the answer. A critique opens with its fact in the textbook's words, cut before
the class ("It is in group 17; recall what that group is called."), and closes with its verdict
on the attempt.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from .data import Problem, quotas

LETTERS = "ABCD"

# Chemistry. (class option, hint) per class; items are (key, class index).
GROUPS = [("alkali metals", "group 1"), ("alkaline earth metals", "group 2"),
          ("halogens", "group 17"), ("noble gases", "group 18")]
ION_CHARGES = ["+1", "+2", "-1", "0 (no ion)"]
# (symbol, name, group index)
ELEMENTS = [
    ("Li", "lithium", 0), ("Na", "sodium", 0), ("K", "potassium", 0), ("Rb", "rubidium", 0),
    ("Cs", "caesium", 0), ("Be", "beryllium", 1), ("Mg", "magnesium", 1), ("Ca", "calcium", 1),
    ("Sr", "strontium", 1), ("Ba", "barium", 1), ("F", "fluorine", 2), ("Cl", "chlorine", 2),
    ("Br", "bromine", 2), ("I", "iodine", 2), ("At", "astatine", 2), ("Ne", "neon", 3),
    ("Ar", "argon", 3), ("Kr", "krypton", 3), ("Xe", "xenon", 3), ("He", "helium", 3),
]
COMPOUND_CLASSES = [("acid", "releases H+ ions in water"), ("base", "releases OH- ions in water"),
                    ("salt", "is made of a cation and the anion of an acid"),
                    ("oxide", "is one element bonded only to oxygen")]
# (formula, class index)
COMPOUNDS = [
    ("HCl", 0), ("HBr", 0), ("HNO3", 0), ("H2SO4", 0), ("CH3COOH", 0),
    ("NaOH", 1), ("KOH", 1), ("LiOH", 1), ("Ca(OH)2", 1), ("NH3", 1),
    ("NaCl", 2), ("KBr", 2), ("CaCl2", 2), ("KNO3", 2), ("NH4Cl", 2),
    ("CO2", 3), ("SO2", 3), ("MgO", 3), ("CaO", 3), ("Fe2O3", 3),
]

# Physics.
UNITS = [("joule", "J", "kg m^2/s^2"), ("newton", "N", "kg m/s^2"), ("pascal", "Pa", "kg/(m s^2)"),
         ("watt", "W", "kg m^2/s^3")]
QUANTITIES = [
    ("energy", 0), ("work", 0), ("kinetic energy", 0), ("potential energy", 0), ("heat", 0),
    ("force", 1), ("weight", 1), ("tension", 1), ("friction", 1), ("thrust", 1),
    ("pressure", 2), ("stress", 2), ("air pressure", 2), ("fluid pressure", 2), ("Young's modulus", 2),
    ("power", 3), ("electric power", 3), ("radiant flux", 3), ("mechanical power", 3),
    ("rate of energy transfer", 3),
]
BRANCHES = [("mechanics", "motion and forces"), ("thermodynamics", "heat and temperature"),
            ("electromagnetism", "electric charges and magnets"), ("optics", "the behaviour of light")]
TOPICS = [
    ("momentum", 0), ("torque", 0), ("projectile motion", 0), ("inertia", 0), ("elastic collisions", 0),
    ("heat engines", 1), ("specific heat capacity", 1), ("thermal expansion", 1), ("latent heat", 1),
    ("entropy", 1), ("electric charge", 2), ("capacitors", 2), ("magnetic fields", 2),
    ("resistors", 2), ("inductors", 2), ("refraction", 3), ("lenses", 3), ("mirrors", 3),
    ("diffraction gratings", 3), ("total internal reflection", 3),
]
INSTRUMENTS = [("ammeter", "amperes"), ("voltmeter", "volts"), ("thermometer", "degrees Celsius"),
               ("barometer", "hectopascals")]
MEASURED = [
    ("electric current", 0), ("the current in a circuit", 0), ("the current through a lamp", 0),
    ("the current in a wire", 0), ("the flow of charge through a cable", 0),
    ("voltage", 1), ("potential difference", 1), ("the voltage of a battery", 1),
    ("the voltage across a resistor", 1), ("electromotive force", 1),
    ("temperature", 2), ("body temperature", 2), ("the temperature of water", 2), ("air temperature", 2),
    ("the boiling point of a liquid", 2),
    ("atmospheric pressure", 3), ("barometric pressure", 3), ("the pressure of the atmosphere", 3),
    ("the air pressure outside", 3), ("changes in atmospheric pressure", 3),
]


COMMON_PER_CLASS = 4  # of each class's five items, the first four are common knowledge (below)


def _draw(rng: random.Random, table: list[tuple]) -> tuple[tuple, bool]:
    """A random table row and whether it is common knowledge: every table lists five items per
    class, class by class; the last of each class is specialist knowledge, which only a domain's
    own fine-tuning teaches (the demo base model never reads it)."""
    i = rng.randrange(len(table))
    klass = table[i][-1]
    return table[i], [row[-1] for row in table[:i]].count(klass) < COMMON_PER_CLASS


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _solution(reasoning: str, options: list[tuple[str, str]], letter: str) -> str:
    text = dict(options)[letter]
    return (f"<reasoning>\n{reasoning}\nThe answer is {text}, option {letter}.\n</reasoning>\n"
            f"<answer>\n{letter}\n</answer>")


def _fixed(classes: list[str], index: int) -> tuple[list[tuple[str, str]], str]:
    return list(zip(LETTERS, classes)), LETTERS[index]


@dataclass(frozen=True)
class Family:
    """A question family: its table, its four classes in option order, and the templates that an
    item's fields fill in (`item` names the field the question names the item by)."""
    name: str
    table: list[tuple]
    classes: list[str]
    fields: Callable[[tuple], dict[str, str]]
    item: str
    phrasings: tuple[str, ...]
    reasoning: str
    concept: str
    critique: str

    def __call__(self, rng: random.Random):
        """(question, options, answer, reasoning, concept, critique, common knowledge?, item)"""
        row, known = _draw(rng, self.table)
        f = self.fields(row)
        options, answer = _fixed(self.classes, row[-1])
        return (rng.choice(self.phrasings).format(**f), options, answer, self.reasoning.format(**f),
                self.concept.format(**f), self.critique.format(**f), known, f[self.item])


def _element(row):
    sym, name, g = row
    return dict(sym=sym, name=name, group=GROUPS[g][0], number=GROUPS[g][1], charge=ION_CHARGES[g])


def _quantity(row):
    unit, sym, base = UNITS[row[1]]
    return dict(quantity=row[0], unit=unit, sym=sym, base=base)


FAMILIES: dict[str, list[Family]] = {
    "chemistry": [
        Family("element_group", ELEMENTS, [c for c, _ in GROUPS], _element, "name",
               ("To which group of the periodic table does {name} belong?",
                "In the periodic table, {name} is one of which group?",
                "Which family of elements includes {name}?",
                "Name the group of the periodic table that contains {name}.",
                "Which group is {name} a member of?"),
               "It is in {number}, the {group}.", "group of {name}",
               "It is in {number}; recall what that group is called. The attempt put {name} in the wrong family."),
        Family("symbol_group", ELEMENTS, [c for c, _ in GROUPS], _element, "sym",
               ("The element with the chemical symbol {sym} belongs to which group?",
                "Which group of the periodic table holds the element {sym}?",
                "The chemical symbol {sym} names an element of which family?",
                "Which family does the element {sym} belong to?",
                "Name the group of the element with symbol {sym}."),
               "It is in {number}, the {group}.", "element {sym}",
               "It is in {number}; recall what that group is called. The attempt misread the chemical symbol."),
        Family("ion_charge", ELEMENTS, ION_CHARGES, _element, "name",
               ("What charge does the usual ion of {name} carry?",
                "Which charge has the ion that {name} usually forms?",
                "In its compounds, {name} usually forms an ion of which charge?",
                "What is the charge of a {name} ion?",
                "Which ion charge is typical of {name}?"),
               "It is in {number}, so the charge of its usual ion is {charge}.", "ion of {name}",
               "It is in {number}; count the electrons it gains or loses to fill its outer shell. The attempt "
               "gave {name} the ion charge of another group."),
        Family("compound_class", COMPOUNDS, [k for k, _ in COMPOUND_CLASSES],
               lambda row: dict(formula=row[0], hint=COMPOUND_CLASSES[row[1]][1],
                                a_class=_a(COMPOUND_CLASSES[row[1]][0])), "formula",
               ("Which class of compound is {formula}?",
                "The compound {formula} is best classified as which?",
                "How is the compound {formula} classified?",
                "To which class of compounds does {formula} belong?",
                "Classify the compound {formula}."),
               "It {hint}, so it is {a_class}.", "compound {formula}",
               "It {hint}; classify it by that. The attempt misclassified the compound."),
    ],
    "physics": [
        Family("si_unit", QUANTITIES, [name for name, _, _ in UNITS], _quantity, "quantity",
               ("What is the SI unit of {quantity}?",
                "In SI units, {quantity} is measured in which unit?",
                "Which SI unit is used for {quantity}?",
                "Name the SI unit of {quantity}.",
                "Which unit does the SI system use for {quantity}?"),
               "It is measured in {base}, which is the {unit}.", "SI unit of {quantity}",
               "It is measured in {base}; name that unit. The attempt picked the unit of a different "
               "quantity."),
        Family("unit_symbol", QUANTITIES, [sym for _, sym, _ in UNITS], _quantity, "quantity",
               ("Which symbol denotes the SI unit of {quantity}?",
                "The SI unit of {quantity} has which symbol?",
                "Give the symbol of the SI unit of {quantity}.",
                "What is the symbol of the SI unit of {quantity}?",
                "Which symbol stands for the SI unit of {quantity}?"),
               "It is measured in {base}, which is the {unit}, symbol {sym}.", "symbol of the unit of {quantity}",
               "It is measured in {base}; name that unit and its symbol. The attempt picked the symbol of "
               "a different unit."),
        Family("branch", TOPICS, [name for name, _ in BRANCHES],
               lambda row: dict(topic=row[0], about=BRANCHES[row[1]][1], branch=BRANCHES[row[1]][0]), "topic",
               ("Which branch of physics studies {topic}?",
                "The study of {topic} belongs to which branch of physics?",
                "In which branch of physics would you learn about {topic}?",
                "Which area of physics covers {topic}?",
                "Name the branch of physics that deals with {topic}."),
               "It is about {about}, which is {branch}.", "{topic} in physics",
               "It is about {about}; pick the branch of physics that studies those. The attempt chose the "
               "wrong branch."),
        Family("instrument", MEASURED, [name for name, _ in INSTRUMENTS],
               lambda row: dict(measured=row[0], short=row[0].removeprefix("the "), reading=INSTRUMENTS[row[1]][1],
                                an_instrument=_a(INSTRUMENTS[row[1]][0])), "measured",
               ("Which instrument measures {measured}?",
                "To measure {measured}, which instrument is used?",
                "What instrument would you use to measure {measured}?",
                "Name the instrument that measures {measured}.",
                "Which instrument is used to measure {measured}?"),
               "It reads in {reading}, which is {an_instrument}.", "instrument for {short}",
               "It reads in {reading}; pick the instrument that does. The attempt chose the wrong "
               "instrument."),
    ],
}
SYNTHETIC_DOMAINS = tuple(FAMILIES)


def textbook(domain: str, common_only: bool = False) -> list[tuple[str, str]]:
    """(topic, statement) pairs: every fact of a domain's tables (or only its common knowledge),
    stated in exactly the words the worked solutions use; the knowledge a pretrained model would
    bring. No question, option list or answer letter appears in them."""
    if domain not in FAMILIES:
        raise ValueError(f"unknown synthetic domain {domain!r}; valid: {', '.join(FAMILIES)}")
    out = []
    for family in FAMILIES[domain]:
        seen = set()
        for seed in range(400):  # every family draws every item of its table within a few dozen tries
            _, _, _, reasoning, concept, _, common, _ = family(random.Random(seed))
            if (concept, reasoning) not in seen and (common or not common_only):
                seen.add((concept, reasoning))
                out.append((concept, reasoning))
    return out


def generate(domain: str, n: int, seed: int = 0) -> list[Problem]:
    """n distinct problems of a synthetic domain, each with a worked solution and, in meta, a
    tutor-style feedback example for a wrong attempt."""
    if domain not in FAMILIES:
        raise ValueError(f"unknown synthetic domain {domain!r}; valid: {', '.join(FAMILIES)}")
    rng = random.Random(f"{domain}:{seed}")
    out: list[Problem] = []
    seen: set[str] = set()
    for _ in range(n * 200):
        if len(out) == n:
            break
        family = rng.choice(FAMILIES[domain])
        question, options, answer, reasoning, concept, critique, common, item = family(rng)
        if question in seen:
            continue
        seen.add(question)
        out.append(Problem(
            id=f"{domain}-synth-{seed}-{len(out)}", domain=domain, question=question,
            options=options, answer=answer, solution=_solution(reasoning, options, answer),
            meta={"family": family.name, "source": "synthetic", "common": common, "item": item,
                  "feedback": f"<concept>{concept}</concept>\n{critique}"}))
    if len(out) < n:
        raise ValueError(f"synthetic domain {domain!r} has only {len(out)} distinct problems, asked for {n}")
    return out


def wrong_attempt(problem: Problem, rng: random.Random) -> str:
    """A well-formed response that reasons its way to a wrong option, as a student who misremembers
    the fact would (for feedback examples and tests)."""
    letter = rng.choice([label for label, _ in problem.options if label != problem.answer])
    return _solution(reasoning_lines(problem.meta["family"])[letter], problem.options, letter)


def reasoning_lines(family: str) -> dict[str, str]:
    """The reasoning line that leads to each letter of a family (the lines never name the item)."""
    fam = next(f for fs in FAMILIES.values() for f in fs if f.name == family)
    return {LETTERS[row[-1]]: fam.reasoning.format(**fam.fields(row)) for row in fam.table}


def splits(domain: str, n_train: int, n_test: int, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """Disjoint (train, test) problem lists of a synthetic domain: no question text in both. The
    test split holds every family and its common and specialist items in their shares of all the
    problems (largest remainders), so a student's score on it does not hang on the luck of the draw."""
    problems = generate(domain, n_train + n_test, seed)
    strata: dict[tuple, list[int]] = {}
    for i, p in enumerate(problems):
        strata.setdefault(stratum(p), []).append(i)
    quota = quotas({k: len(v) for k, v in strata.items()}, n_test)
    held = {i for k, v in strata.items() for i in v[:quota[k]]}
    return ([p for i, p in enumerate(problems) if i not in held],
            [p for i, p in enumerate(problems) if i in held])


def stratum(problem: Problem) -> tuple[str, bool]:
    """What a split keeps in proportion: the problem's family and whether its item is common."""
    return problem.meta["family"], problem.meta["common"]
