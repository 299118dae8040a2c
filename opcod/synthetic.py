"""Seeded synthetic science MCQs (chemistry and physics roles) with worked solutions and feedback.

Tiny models learn finite facts quickly and multi-digit arithmetic hardly at all, so most problems
ask about a fact from a small table, and each fact is asked from several directions (symbol ->
name, name -> atomic number, ...). A held-out question is then new text about a known fact.
"""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

from .data import Problem

LETTERS = "ABCD"

# (symbol, name, atomic number, molar mass g/mol)
ELEMENTS = [
    ("H", "hydrogen", 1, 1.008), ("He", "helium", 2, 4.003), ("Li", "lithium", 3, 6.94),
    ("Be", "beryllium", 4, 9.012), ("B", "boron", 5, 10.81), ("C", "carbon", 6, 12.01),
    ("N", "nitrogen", 7, 14.01), ("O", "oxygen", 8, 16.00), ("F", "fluorine", 9, 19.00),
    ("Ne", "neon", 10, 20.18), ("Na", "sodium", 11, 22.99), ("Mg", "magnesium", 12, 24.31),
    ("Al", "aluminium", 13, 26.98), ("Si", "silicon", 14, 28.09), ("P", "phosphorus", 15, 30.97),
    ("S", "sulfur", 16, 32.06), ("Cl", "chlorine", 17, 35.45), ("Ar", "argon", 18, 39.95),
    ("K", "potassium", 19, 39.10), ("Ca", "calcium", 20, 40.08), ("Fe", "iron", 26, 55.85),
    ("Cu", "copper", 29, 63.55), ("Zn", "zinc", 30, 65.38), ("Ag", "silver", 47, 107.87),
    ("Au", "gold", 79, 196.97),
]
MASS = {sym: mass for sym, _, _, mass in ELEMENTS}
# (formula, {symbol: count}, common name)
COMPOUNDS = [
    ("H2O", {"H": 2, "O": 1}, "water"), ("CO2", {"C": 1, "O": 2}, "carbon dioxide"),
    ("NaCl", {"Na": 1, "Cl": 1}, "sodium chloride"), ("CH4", {"C": 1, "H": 4}, "methane"),
    ("NH3", {"N": 1, "H": 3}, "ammonia"), ("O2", {"O": 2}, "oxygen gas"),
    ("N2", {"N": 2}, "nitrogen gas"), ("HCl", {"H": 1, "Cl": 1}, "hydrogen chloride"),
    ("CaCO3", {"Ca": 1, "C": 1, "O": 3}, "calcium carbonate"), ("KCl", {"K": 1, "Cl": 1}, "potassium chloride"),
    ("MgO", {"Mg": 1, "O": 1}, "magnesium oxide"), ("SO2", {"S": 1, "O": 2}, "sulfur dioxide"),
    ("CO", {"C": 1, "O": 1}, "carbon monoxide"), ("H2", {"H": 2}, "hydrogen gas"),
    ("NaOH", {"Na": 1, "O": 1, "H": 1}, "sodium hydroxide"), ("H2SO4", {"H": 2, "S": 1, "O": 4}, "sulfuric acid"),
]
# (quantity, SI unit, unit symbol)
QUANTITIES = [
    ("force", "newton", "N"), ("energy", "joule", "J"), ("power", "watt", "W"),
    ("pressure", "pascal", "Pa"), ("electric charge", "coulomb", "C"), ("frequency", "hertz", "Hz"),
    ("electric potential", "volt", "V"), ("electrical resistance", "ohm", "Ω"),
    ("magnetic flux density", "tesla", "T"), ("capacitance", "farad", "F"),
    ("mass", "kilogram", "kg"), ("time", "second", "s"), ("electric current", "ampere", "A"),
    ("temperature", "kelvin", "K"), ("amount of substance", "mole", "mol"),
    ("luminous intensity", "candela", "cd"), ("inductance", "henry", "H"),
]
# (large unit, small unit, how many small units in one large unit)
CONVERSIONS = [
    ("kilometre", "metres", 1000), ("hour", "seconds", 3600), ("minute", "seconds", 60),
    ("metre", "centimetres", 100), ("kilogram", "grams", 1000), ("litre", "millilitres", 1000),
    ("day", "hours", 24), ("kilowatt", "watts", 1000), ("megajoule", "kilojoules", 1000),
    ("centimetre", "millimetres", 10), ("tonne", "kilograms", 1000), ("kilowatt-hour", "kilojoules", 3600),
]


def molar_mass(composition: dict[str, int]) -> float:
    return sum(MASS[sym] * n for sym, n in composition.items())


def _mcq(rng: random.Random, correct: str, distractors: list[str]) -> tuple[list[tuple[str, str]], str]:
    pool = [d for d in dict.fromkeys(distractors) if d != correct]
    texts = [correct] + rng.sample(pool, 3)
    rng.shuffle(texts)
    options = list(zip(LETTERS, texts))
    return options, LETTERS[texts.index(correct)]


def _solution(reasoning: str, options: list[tuple[str, str]], letter: str) -> str:
    # After the recalled fact, the options are checked in order up to the one that matches, so the
    # letter is the last line's: copying and a yes/no per line came sooner to the tiny demo model
    # than finding a text among the options. The answer text follows a space, as in the "A: text"
    # option lines, so it is the same tokens in both places.
    checks = []
    for label, text in options:
        checks.append(f"{label}: {text} - {'yes' if label == letter else 'no'}")
        if label == letter:
            break
    text = dict(options)[letter]
    return (f"<reasoning>\n{reasoning}\n" + "\n".join(checks) + f"\nThe answer is {text}, option {letter}."
            f"\n</reasoning>\n<answer>\n{letter}\n</answer>")


# Each family: rng -> (family, fact key, question, options, answer, reasoning, concept, critique)
def _symbol_to_name(rng):
    sym, name, z, _ = rng.choice(ELEMENTS)
    options, ans = _mcq(rng, name, [e[1] for e in ELEMENTS])
    return (rng.choice([f"Which element has the chemical symbol {sym}?",
                        f"The chemical symbol {sym} denotes which element?",
                        f"Name the element whose chemical symbol is {sym}."]), options, ans,
            f"The chemical symbol {sym} stands for {name}, atomic number {z}.",
            f"chemical symbol {sym}",
            f"The attempt matched the chemical symbol {sym} to the wrong element. Recall which element "
            f"the symbol {sym} abbreviates (often from its Latin name) before comparing the options.")


def _name_to_symbol(rng):
    sym, name, z, _ = rng.choice(ELEMENTS)
    options, ans = _mcq(rng, sym, [e[0] for e in ELEMENTS])
    return (rng.choice([f"What is the chemical symbol of {name}?",
                        f"Which chemical symbol stands for {name}?",
                        f"In the periodic table, {name} is written with which chemical symbol?"]), options, ans,
            f"{name.capitalize()} (atomic number {z}) has the chemical symbol {sym}.",
            f"chemical symbol of {name}",
            f"The attempt gave the symbol of a different element than {name}. Think about which one- or "
            f"two-letter symbol the periodic table lists for {name} and check each option against it.")


def _atomic_number(rng):
    sym, name, z, _ = rng.choice(ELEMENTS)
    wrong = [str(v) for v in (z - 2, z - 1, z + 1, z + 2, z + 3) if v > 0]
    options, ans = _mcq(rng, str(z), wrong)
    return (rng.choice([f"What is the atomic number of {name}?",
                        f"How many protons does one atom of {name} have (its atomic number)?",
                        f"Which atomic number belongs to {name}?"]), options, ans,
            f"{name.capitalize()} ({sym}) has {z} protons, so its atomic number is {z}.",
            f"atomic number of {name}",
            f"The attempt was off by a few places in the periodic table. The atomic number counts the "
            f"protons of {name}; locate {name} in its period and count again.")


def _molar_mass(rng):
    formula, comp, common = rng.choice(COMPOUNDS)
    m = molar_mass(comp)
    terms = " + ".join(f"{n} x {MASS[s]:.2f}" if n > 1 else f"{MASS[s]:.2f}" for s, n in comp.items())
    # Plausible slips: ignoring subscripts, counting one atom twice, swapping an element's mass.
    slips = {molar_mass({s: 1 for s in comp}), m + MASS[max(comp, key=MASS.get)],
             m - min(MASS[s] for s in comp) / 2, m * 1.5, m + 2.02, m - 1.01, m + 16.00}
    distractors = [f"{v:.2f} g/mol" for v in sorted(slips) if abs(v - m) > 0.5 and v > 0]
    options, ans = _mcq(rng, f"{m:.2f} g/mol", distractors)
    return (rng.choice([f"What is the molar mass of {formula} ({common})?",
                        f"Calculate the molar mass of {common}, {formula}.",
                        f"One mole of {formula} ({common}) has what molar mass?"]), options, ans,
            f"Add the atomic masses in {formula}: {terms} = {m:.2f} g/mol.",
            f"molar mass of {formula}",
            f"The attempt did not weight each atomic mass by its subscript in {formula}. Multiply each "
            f"element's molar mass by the number of its atoms, then add.")


def _si_unit(rng):
    quantity, unit, symbol = rng.choice(QUANTITIES)
    options, ans = _mcq(rng, unit, [q[1] for q in QUANTITIES])
    return (rng.choice([f"What is the SI unit of {quantity}?",
                        f"In SI units, {quantity} is measured in which unit?",
                        f"Which SI unit is used for {quantity}?"]), options, ans,
            f"In the SI system, {quantity} is measured in the {unit} ({symbol}).",
            f"SI unit of {quantity}",
            f"The attempt picked the unit of a different quantity. Recall how {quantity} is defined and "
            f"which named SI unit belongs to it.")


def _unit_symbol(rng):
    quantity, unit, symbol = rng.choice(QUANTITIES)
    options, ans = _mcq(rng, quantity, [q[0] for q in QUANTITIES])
    return (rng.choice([f"Which physical quantity is measured in the SI unit {unit} ({symbol})?",
                        f"The SI unit {unit} ({symbol}) measures which physical quantity?",
                        f"What does the SI unit {unit} ({symbol}) quantify?"]), options, ans,
            f"The {unit} ({symbol}) is the SI unit of {quantity}.",
            f"SI unit {unit}",
            f"The attempt linked the {unit} to the wrong quantity. Recall what the {unit} is defined to "
            f"measure and compare with each option.")


def _conversion(rng):
    big, small, factor = rng.choice(CONVERSIONS)
    wrong = [str(v) for v in {factor * 10, factor // 10 or 1, 60, 100, 1000, 3600, 24, 10} if v != factor]
    options, ans = _mcq(rng, str(factor), wrong)
    return (rng.choice([f"How many {small} are in one {big}?",
                        f"One {big} equals how many {small}?",
                        f"Convert one {big} into {small}."]), options, ans,
            f"One {big} equals {factor} {small}.",
            f"{small} in one {big}",
            f"The attempt used the wrong conversion factor between {big} and {small}. Recall the "
            f"definition of the {big} in {small} and check the power of ten or time base.")


# (constant, approximate value with unit, distractor values)
CONSTANTS = [
    ("the speed of light in vacuum", "3.0 x 10^8 m/s", ["3.0 x 10^6 m/s", "3.4 x 10^2 m/s", "9.8 x 10^8 m/s"]),
    ("the acceleration due to gravity at Earth's surface", "9.8 m/s^2", ["6.7 m/s^2", "3.0 m/s^2", "1.6 m/s^2"]),
    ("the speed of sound in air at 20 C", "343 m/s", ["34.3 m/s", "3430 m/s", "1500 m/s"]),
    ("the elementary charge", "1.6 x 10^-19 C", ["9.1 x 10^-31 C", "6.6 x 10^-34 C", "1.6 x 10^-27 C"]),
    ("Planck's constant", "6.6 x 10^-34 J s", ["6.0 x 10^23 J s", "1.4 x 10^-23 J s", "6.7 x 10^-11 J s"]),
    ("Avogadro's number", "6.0 x 10^23 per mole", ["6.6 x 10^23 per mole", "1.6 x 10^19 per mole", "3.0 x 10^8 per mole"]),
    ("the Boltzmann constant", "1.4 x 10^-23 J/K", ["8.3 x 10^-23 J/K", "6.6 x 10^-34 J/K", "1.6 x 10^-19 J/K"]),
    ("the gravitational constant", "6.7 x 10^-11 N m^2/kg^2", ["9.8 x 10^-11 N m^2/kg^2", "6.7 x 10^-34 N m^2/kg^2", "8.9 x 10^9 N m^2/kg^2"]),
    ("the mass of an electron", "9.1 x 10^-31 kg", ["1.7 x 10^-27 kg", "9.1 x 10^-19 kg", "1.6 x 10^-31 kg"]),
    ("the mass of a proton", "1.7 x 10^-27 kg", ["9.1 x 10^-31 kg", "1.7 x 10^-19 kg", "6.7 x 10^-27 kg"]),
    ("standard atmospheric pressure", "101 kPa", ["10.1 kPa", "1013 kPa", "76 kPa"]),
    ("the freezing point of water", "273 K", ["0 K", "373 K", "32 K"]),
]


def _constant(rng):
    name, value, wrong = rng.choice(CONSTANTS)
    options, ans = _mcq(rng, value, wrong)
    return (rng.choice([f"What is the approximate value of {name}?",
                        f"Which value is closest to {name}?",
                        f"Approximately, {name} equals which value?"]), options, ans,
            f"The value of {name} is about {value}.",
            name.removeprefix("the "),
            f"The attempt used the wrong value for {name.removeprefix('the ')}. Recall the order of magnitude and "
            f"the unit of this constant before comparing the options.")


def _speed_from_rest(rng):
    a, t = rng.randint(1, 9), rng.randint(1, 5)
    v = a * t
    slips = [v + a, v - a, a + t, 2 * v, v + t, v + 1, v - 1, v + 2, v + 3]  # common slips first
    options, ans = _mcq(rng, f"{v} m/s", [f"{x} m/s" for x in dict.fromkeys(slips) if 0 < x != v][:6])
    return (f"An object starts from rest and accelerates uniformly at {a} m/s^2. What is its speed "
            f"after {t} s?", options, ans,
            f"From rest, v = a t = {a} m/s^2 x {t} s = {v} m/s.",
            "accelerates uniformly from rest",
            "The attempt did not use the uniform-acceleration relation for an object starting from rest. "
            "Speed grows by the acceleration every second; multiply acceleration by elapsed time.")


FAMILIES: dict[str, list[Callable]] = {
    "chemistry": [_symbol_to_name, _name_to_symbol, _atomic_number, _molar_mass],
    "physics": [_si_unit, _unit_symbol, _conversion, _constant, _speed_from_rest],
}
SYNTHETIC_DOMAINS = tuple(FAMILIES)


def textbook(domain: str) -> list[tuple[str, str]]:
    """(topic, statement) pairs: every fact of a domain's tables stated plainly, the knowledge a
    pretrained model would bring. No question, option or answer letter appears in them."""
    if domain == "chemistry":
        out = [(name, f"{name.capitalize()} has the chemical symbol {sym} and atomic number {z}; "
                      f"its molar mass is {mass:.2f} g/mol.") for sym, name, z, mass in ELEMENTS]
        out += [(sym, f"The chemical symbol {sym} stands for {name}, atomic number {z}.")
                for sym, name, z, _ in ELEMENTS]
        out += [(formula, f"{formula} is {common}; its molar mass is {molar_mass(comp):.2f} g/mol.")
                for formula, comp, common in COMPOUNDS]
        return out
    if domain == "physics":
        out = [(q, f"In the SI system, {q} is measured in the {u} ({sym}).") for q, u, sym in QUANTITIES]
        out += [(u, f"The {u} ({sym}) is the SI unit of {q}.") for q, u, sym in QUANTITIES]
        out += [(big, f"One {big} equals {f} {small}.") for big, small, f in CONVERSIONS]
        out += [(name.removeprefix("the "), f"The value of {name} is about {value}.") for name, value, _ in CONSTANTS]
        out += [(f"{a} x {t}", f"{a} x {t} = {a * t}.") for a in range(1, 10) for t in range(1, 6)]
        return out
    raise ValueError(f"unknown synthetic domain {domain!r}; valid: {', '.join(FAMILIES)}")


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
        question, options, answer, reasoning, concept, critique = family(rng)
        if question in seen:
            continue
        seen.add(question)
        out.append(Problem(
            id=f"{domain}-synth-{seed}-{len(out)}", domain=domain, question=question,
            options=options, answer=answer, solution=_solution(reasoning, options, answer),
            meta={"family": family.__name__.lstrip("_"), "source": "synthetic",
                  "feedback": f"<concept>{concept}</concept>\n{critique}"}))
    if len(out) < n:
        raise ValueError(f"synthetic domain {domain!r} has only {len(out)} distinct problems, asked for {n}")
    return out


def reshuffled(problem: Problem, rng: random.Random) -> Problem:
    """The same question with its options in another order (answer letter and solution follow)."""
    texts = [t for _, t in problem.options]
    correct = dict(problem.options)[problem.answer]
    rng.shuffle(texts)
    options = list(zip(LETTERS, texts))
    letter = LETTERS[texts.index(correct)]
    reasoning = problem.solution.split("<reasoning>\n", 1)[1].split("\n", 1)[0]
    return dataclasses.replace(problem, options=options, answer=letter,
                               solution=_solution(reasoning, options, letter))


def wrong_attempt(problem: Problem, rng: random.Random) -> str:
    """A well-formed response that picks a wrong option (for feedback examples and tests)."""
    letter = rng.choice([label for label, _ in problem.options if label != problem.answer])
    text = dict(problem.options)[letter]
    return _solution(f"I think the answer is {text}.", problem.options, letter)


def splits(domain: str, n_train: int, n_test: int, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """Disjoint (train, test) problem lists of a synthetic domain: no question text in both."""
    problems = generate(domain, n_train + n_test, seed)
    return problems[n_test:], problems[:n_test]
