"""Prompts (student, teacher reprompt, tutor) and the synthetic generator, verified by recomputation."""
import random
import re

import pytest

from opcod import prompts, synthetic
from opcod.feedback import anchor, sanitize
from opcod.grading import reward


def test_student_prompt_format():
    text = prompts.student_user_message("What?", [("A", "x"), ("B", "y")])
    assert text == "What?\n\nA: x\nB: y\nPlease reason step by step."


def test_reprompt_exact_format_and_think_removed():
    out = prompts.reprompt_message("P", "<think>hidden</think>sol", "fb")
    assert out == ("P\nCorrect solution:\n\nsol\nThe following is feedback on your earlier attempt:\n\nfb"
                   "\n\nCorrectly solve the original question.")
    assert prompts.reprompt_message("P", None, None) == "P\n\nCorrectly solve the original question."
    assert prompts.reprompt_message("P", None, "f").startswith("P\nThe following is feedback")


def test_caps_apply_before_templating(tokenizer):
    long_solution = "The molar mass of water is 18.02 g/mol. " * 30
    user = prompts.reprompt_message("P", long_solution, "feedback " * 50, tokenizer,
                                    max_solution_tokens=12, max_feedback_tokens=5)
    rendered = prompts.render(tokenizer, prompts.messages(user))
    solution_part = user.split("Correct solution:\n\n")[1].split("\nThe following")[0]
    assert len(tokenizer.encode(solution_part, add_special_tokens=False)) <= 12
    # the assembled chat is whole: it still ends with the assistant header and empty think block
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert rendered.count("Correctly solve the original question.") == 1


def test_render_requires_chat_template(tokenizer):
    import copy
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        prompts.render(bare, prompts.messages("hi"))


def test_tutor_prompt_contains_problem_and_attempt():
    msgs = prompts.tutor_messages("Q text", "<think>x</think>attempt")
    assert msgs[0]["role"] == "system" and "<concept>" in msgs[1]["content"]
    assert "Q text" in msgs[1]["content"] and "attempt" in msgs[1]["content"] and "<think>" not in msgs[1]["content"]


def _recompute(p):
    """The right option text, recomputed from the generator's tables, never from its answer."""
    q, fam = p.question, p.meta["family"]
    by_sym = {e[0]: e for e in synthetic.ELEMENTS}
    by_name = {e[1]: e for e in synthetic.ELEMENTS}
    if fam == "symbol_to_name":
        return by_sym[re.search(r"symbol (?:is )?(\w+)[ ?.]", q).group(1)][1]
    if fam == "name_to_symbol":
        return by_name[re.search(r"(?:symbol of|stands for|table,) (\w+)", q).group(1)][0]
    if fam == "atomic_number":
        return str(by_name[re.search(r"(?:number of|atom of|belongs to) (\w+)", q).group(1)][2])
    if fam == "molar_mass":
        formula = re.search(r"\b((?:[A-Z][a-z]?\d*)+)\b", q.replace("SI", "")).group(1)
        total = sum(dict((e[0], e[3]) for e in synthetic.ELEMENTS)[s] * int(n or 1)
                    for s, n in re.findall(r"([A-Z][a-z]?)(\d*)", formula))
        return f"{total:.2f} g/mol"
    if fam == "si_unit":
        quantity = re.search(r"(?:unit of (.+)\?|SI units, (.+) is measured|used for (.+)\?)", q)
        return {qq: u for qq, u, _ in synthetic.QUANTITIES}[next(g for g in quantity.groups() if g)]
    if fam == "unit_symbol":
        return {u: qq for qq, u, _ in synthetic.QUANTITIES}[re.search(r"SI unit (\w+) \(", q).group(1)]
    if fam == "conversion":
        m = (re.search(r"How many (.+) are in one (.+)\?", q) or re.search(r"One (.+) equals how many (.+)\?", q)
             or re.search(r"Convert one (.+) into (.+)\.", q))
        a, b = m.groups()
        big, small = (b, a) if q.startswith("How many") else (a, b)
        return str({(bb, ss): f for bb, ss, f in synthetic.CONVERSIONS}[(big, small)])
    if fam == "constant":
        name = re.search(r"(?:value of|closest to|Approximately,) (.+?)(?:\?| equals)", q).group(1)
        return {n: v for n, v, _ in synthetic.CONSTANTS}[name]
    if fam == "speed_from_rest":
        a, t = map(int, re.search(r"at (\d+) m/s\^2.*after (\d+) s", q).groups())
        return f"{a * t} m/s"
    raise AssertionError(fam)


@pytest.mark.parametrize("domain", synthetic.SYNTHETIC_DOMAINS)
def test_synthetic_answers_verified_by_recomputation(domain):
    problems = synthetic.generate(domain, 150, seed=1)
    assert len({p.question for p in problems}) == 150
    families = {p.meta["family"] for p in problems}
    assert len(families) == len(synthetic.FAMILIES[domain])
    rng = random.Random(0)
    for p in problems:
        labels = [label for label, _ in p.options]
        texts = [t for _, t in p.options]
        assert labels == ["A", "B", "C", "D"] and len(set(texts)) == 4
        assert dict(p.options)[p.answer] == _recompute(p)
        assert reward(p.solution, p.answer) == 1.0 and "<reasoning>" in p.solution
        assert reward(synthetic.wrong_attempt(p, rng), p.answer) == 0.0
        # the tutor-style feedback is anchored in the question and does not give the answer away
        fb = p.meta["feedback"]
        anchored = anchor(fb, p.text)
        assert anchored.outcome == "kept", (fb, p.question)
        assert sanitize(anchored.text) == anchored.text
        assert not re.search(rf"(?<![\w.]){re.escape(dict(p.options)[p.answer])}(?![\w.])", anchored.text)


def test_synthetic_is_seeded():
    assert synthetic.generate("physics", 20, seed=5) == synthetic.generate("physics", 20, seed=5)
    assert synthetic.generate("physics", 20, seed=5) != synthetic.generate("physics", 20, seed=6)
    with pytest.raises(ValueError, match="synthetic domain"):
        synthetic.generate("geology", 5)


def test_solution_names_the_answer_in_the_option_lines_tokens(tokenizer):
    # The model finds the letter by matching the answer text against the option lines, so the
    # text must be the same token sequence in both places (a line-initial "5" is not " 5").
    for domain in synthetic.SYNTHETIC_DOMAINS:
        for p in synthetic.generate(domain, 40, seed=2) + [synthetic.reshuffled(q, random.Random(1))
                                                            for q in synthetic.generate(domain, 10, seed=3)]:
            text = dict(p.options)[p.answer]
            line = re.search(r"The answer is (.+), option ([ABCD])\.", p.solution)
            assert line and line.group(1) == text and line.group(2) == p.answer
            ids = tokenizer.encode(" " + text, add_special_tokens=False)
            prompt_ids = tokenizer.encode(p.prompt, add_special_tokens=False)
            solution_ids = tokenizer.encode(p.solution, add_special_tokens=False)
            assert _contains(prompt_ids, ids) and _contains(solution_ids, ids), text


def _contains(seq, sub):
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_solutions_check_options_in_order_up_to_the_answer():
    for domain in synthetic.SYNTHETIC_DOMAINS:
        for p in synthetic.generate(domain, 30, seed=4):
            checks = re.findall(r"^([ABCD]): (.+) - (yes|no)$", p.solution, flags=re.MULTILINE)
            upto = "ABCD".index(p.answer) + 1
            assert [(label, text) for label, text, _ in checks] == p.options[:upto]
            assert [v for *_, v in checks] == ["no"] * (upto - 1) + ["yes"]


def test_copy_drills_repeat_train_options_only():
    from opcod.demo import copy_drills
    train, test = synthetic.splits("chemistry", 60, 20, seed=0)
    recs = copy_drills(train, 50, seed=3)
    train_texts = {t for p in train for _, t in p.options}
    for r in recs:
        lines = r["response"].split("\n")
        assert [line[:3] for line in lines] == ["A: ", "B: ", "C: ", "D: "]
        assert all(line[3:] in train_texts for line in lines)
        assert r["response"] in r["messages"][-1]["content"]  # the lines are copied from the prompt
        assert all(m["role"] != "system" for m in r["messages"])
