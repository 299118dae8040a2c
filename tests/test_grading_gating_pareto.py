"""Grading, avg@k, cognizance gating and Pareto verdicts against hand computations."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opcod.gating import (best_domains, cognizance_gaps, cognizant, feedback_allowed, stronger_domains, tutor_for,
                          within_tau)
from opcod.grading import avg_at_k, bootstrap_interval, extract_answer, reward
from opcod.pareto import dominates, format_table, improvements, mutual_improvement


def sdpo_extract(text: str) -> str | None:
    """SDPO's MCQ reading written out (lasgroup/SDPO verl/utils/reward_score/feedback/mcq.py,
    extract_xml_answer), with SPEC section 3's one change: no <answer> at all reads nothing."""
    if "<answer>" not in text:
        return None
    return text.split("<answer>")[-1].split("</answer>")[0].strip()


@pytest.mark.parametrize("text, expected, strict_expected", [
    ("<reasoning>x</reasoning><answer>B</answer>", "B", "B"),
    ("<answer>\nC\n</answer>", "C", "C"),
    ("<answer>A</answer> then <answer> D </answer>", "D", "D"),       # the last tag wins
    # Guards against grading stricter than SDPO: an unclosed or truncated last answer is still read.
    ("<answer>A</answer> then <answer>D", "D", None),
    ("<reasoning>long</reasoning>\n<answer>\nB\n", "B", None),
    ("<answer>B", "B", None),
    ("<answer>B</answer> trailing </answer>", "B", "B"),             # up to the first close after it
    ("no tags at all", None, None),
    ("B", None, None),                                                 # no tag: 0 (SDPO would read "B")
    ("<answer></answer>", "", ""),
])
def test_extract_answer(text, expected, strict_expected):
    assert extract_answer(text) == expected
    assert extract_answer(text, strict=True) == strict_expected


_pieces = st.sampled_from(["<answer>", "</answer>", "A", "B", " ", "\n", "x", "<reasoning>", "answer", "<"])


@settings(max_examples=500, deadline=None)
@given(st.lists(_pieces, max_size=12).map("".join))
def test_extract_answer_is_sdpos_reading(text):
    """Against SDPO's split-based formula on texts made of tags, letters and filler: guards against a
    reading that drifts from SDPO's (needing the close, taking the first tag, not stripping)."""
    assert extract_answer(text) == sdpo_extract(text)
    strict = extract_answer(text, strict=True)
    assert strict is None or strict == sdpo_extract(text)


def test_reward_is_exact_match():
    assert reward("<answer>B</answer>", "B") == 1.0
    assert reward("<answer>b</answer>", "B") == 0.0
    assert reward("<answer>B.</answer>", "B") == 0.0
    assert reward("B", "B") == 0.0
    # A response cut off after its answer letter scores, as in SDPO; the strict option refuses it.
    assert reward("<reasoning>r</reasoning><answer>\nB", "B") == 1.0
    assert reward("<reasoning>r</reasoning><answer>\nB", "B", strict=True) == 0.0


def test_avg_at_k():
    assert avg_at_k([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1]]) == pytest.approx((0.75 + 0 + 1) / 3)
    with pytest.raises(ValueError):
        avg_at_k([])
    with pytest.raises(ValueError, match="problem 1"):
        avg_at_k([[1.0], []])


def test_paper_example_both_incognizant():
    scores = {"A": {"chem": 1.0, "phys": 0.7}, "B": {"chem": 0.7, "phys": 1.0}}
    gaps = cognizance_gaps(scores)
    assert gaps == pytest.approx({"A": 0.3, "B": 0.3})
    assert cognizant(scores, 0.2) == {"A": False, "B": False}
    assert cognizant(scores, 0.3) == {"A": True, "B": True}


def test_the_threshold_keeps_a_gap_equal_to_tau_on_paper():
    gap = (1.0 - 0.7) / 1.0
    assert gap > 0.3 and within_tau(gap, 0.3) and not within_tau(0.31, 0.3) and within_tau(0.0, 0.0)
    with pytest.raises(ValueError, match="tau"):
        within_tau(0.1, -0.1)


def test_zero_best_domain_counts_zero_and_three_students():
    scores = {"A": {"x": 0.0, "y": 0.5, "z": 0.9}, "B": {"x": 0.0, "y": 0.4, "z": 0.6},
              "C": {"x": 0.0, "y": 0.1, "z": 0.9}}
    gaps = cognizance_gaps(scores)
    assert gaps == pytest.approx({"A": 0.0, "B": 0.1 / 0.5 + 0.3 / 0.9, "C": 0.4 / 0.5})
    assert cognizant(scores, 0.2) == {"A": True, "B": False, "C": False}
    assert best_domains(scores, "C") == {"x", "z"}


def test_bad_scores_and_tau():
    with pytest.raises(ValueError, match="tau"):
        cognizant({"A": {"x": 1.0}}, -0.1)
    with pytest.raises(ValueError, match="'B'"):
        cognizance_gaps({"A": {"x": 1.0, "y": 1.0}, "B": {"x": 1.0}})


def test_gate_modes():
    scores = {"A": {"chem": 0.8, "phys": 0.3}, "B": {"chem": 0.5, "phys": 0.6}}
    # gaps: A = 0.5/0.6 = 0.83, B = 0.3/0.8 = 0.375 -> both incognizant at tau 0.2
    assert not feedback_allowed("cognizance", "A", "chem", scores, 0.2)
    assert feedback_allowed("cognizance", "B", "chem", scores, 0.4)
    assert feedback_allowed("always", "A", "phys", scores, 0.2)
    assert not feedback_allowed("never", "B", "chem", scores, 1.0)
    assert feedback_allowed("domain_selective", "A", "chem", scores, 0.2)
    assert not feedback_allowed("domain_selective", "A", "phys", scores, 0.2)
    assert feedback_allowed("domain_selective", "B", "phys", scores, 0.2)
    with pytest.raises(ValueError, match="gate"):
        feedback_allowed("sometimes", "A", "chem", scores, 0.2)


def test_domain_selective_reads_the_tutors_own_domain_and_the_argmax_only_without_one():
    """A chemistry student that scores best on physics this round (an argmax that moved) still
    tutors only chemistry while incognizant: paper Sec. 4.3 and 5 give feedback "only for problems
    in its stronger domain", the one it was trained for. Guards against reading the stronger domain
    from the current validation argmax when the config names it."""
    # Each is best on the other's domain this round; gaps 0.1/0.6 and 0.05/0.7, both above tau 0.05.
    scores = {"chem": {"chemistry": 0.50, "physics": 0.70}, "phys": {"chemistry": 0.60, "physics": 0.65}}
    assert not any(cognizant(scores, 0.05).values())
    declared = stronger_domains(scores, {"chem": "chemistry", "phys": "physics"})
    assert declared == {"chem": {"domains": ["chemistry"], "from": "config"},
                        "phys": {"domains": ["physics"], "from": "config"}}
    own = declared["chem"]["domains"]
    assert feedback_allowed("domain_selective", "chem", "chemistry", scores, 0.05, own)
    assert not feedback_allowed("domain_selective", "chem", "physics", scores, 0.05, own)
    # without a declared domain: the argmax, and the record says so
    argmax = stronger_domains(scores, {"chem": "", "phys": "physics"})
    assert argmax == {"chem": {"domains": ["physics"], "from": "validation"},
                      "phys": {"domains": ["physics"], "from": "config"}}
    assert feedback_allowed("domain_selective", "chem", "physics", scores, 0.05, argmax["chem"]["domains"])
    assert not feedback_allowed("domain_selective", "chem", "chemistry", scores, 0.05, argmax["chem"]["domains"])
    assert stronger_domains(scores)["phys"] == {"domains": ["chemistry"], "from": "validation"}


def test_tutor_rotation():
    assert tutor_for(["A", "B"], "A", 1) == "B" and tutor_for(["A", "B"], "B", 7) == "A"
    three = ["A", "B", "C"]
    assert [tutor_for(three, "A", r) for r in (1, 2, 3)] == ["B", "C", "B"]
    assert all(tutor_for(three, s, r) != s for s in three for r in range(1, 6))


def test_pareto():
    assert dominates({"x": 0.5, "y": 0.5}, {"x": 0.5, "y": 0.4})
    assert not dominates({"x": 0.5, "y": 0.5}, {"x": 0.5, "y": 0.5})
    assert not dominates({"x": 0.6, "y": 0.3}, {"x": 0.5, "y": 0.4})
    with pytest.raises(ValueError, match="domains"):
        dominates({"x": 1.0}, {"y": 1.0})
    initial = {"A": {"x": 0.5, "y": 0.2}, "B": {"x": 0.3, "y": 0.6}}
    final = {"A": {"x": 0.6, "y": 0.2}, "B": {"x": 0.3, "y": 0.5}}
    assert improvements(initial, final) == {"A": True, "B": False}
    assert not mutual_improvement(initial, final)
    final["B"]["y"] = 0.7
    assert mutual_improvement(initial, final)
    table = format_table(initial, final)
    assert "50.0 ->  60.0 (+10.0)" in table and "mutual Pareto improvement: yes" in table


def test_bootstrap_interval_matches_the_binomial_standard_error():
    """One sample per problem: avg@1 is a binomial proportion, whose 95 % interval is about
    p +- 1.96 sqrt(p (1 - p) / n); the paired change of a table from itself is exactly 0."""
    import random
    rng = random.Random(0)
    n = 400
    rewards = {f"q{i}": [float(rng.random() < 0.7)] for i in range(n)}
    p = avg_at_k(list(rewards.values()))
    lo, hi = bootstrap_interval(rewards)
    half = 1.96 * (p * (1 - p) / n) ** 0.5
    assert lo < p < hi
    assert abs((hi - lo) / 2 - half) < 0.1 * half, ((hi - lo) / 2, half)
    assert bootstrap_interval(rewards, rewards) == (0.0, 0.0)
    assert bootstrap_interval({"a": [1.0, 1.0], "b": [1.0]}) == (1.0, 1.0)  # unequal k is resampled too


def test_bootstrap_interval_of_samples_within_problems():
    """Every problem the same coin (k samples at 0.5): between-problem spread is sampling noise
    alone, so the interval is about 0.5 +- 1.96 sqrt(0.25 / (n k)), wider with fewer samples."""
    import random
    rng = random.Random(1)
    n, k = 100, 8
    rewards = {f"q{i}": [float(rng.random() < 0.5) for _ in range(k)] for i in range(n)}
    lo, hi = bootstrap_interval(rewards)
    half = 1.96 * (0.25 / (n * k)) ** 0.5
    # Two-stage resampling counts the sampling noise about twice (between and within problems).
    assert half < (hi - lo) / 2 < 1.6 * half, ((hi - lo) / 2, half)
    with pytest.raises(ValueError, match="different problems"):
        bootstrap_interval(rewards, {"other": [1.0]})
