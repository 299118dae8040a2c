"""Every prompt opcod writes: the student's, the teacher's reprompt and the tutor's, in one place."""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# SciKnowEval / SDPO system prompt, verbatim.
SYSTEM_PROMPT = (
    "\nGiven a question and four options, please select the right answer. Respond in the following "
    "format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n\nFor the answer, only output "
    "the letter corresponding to the correct option (A, B, C, or D), and nothing else. Do not restate "
    "the answer text. For example, if the answer is \"A\", just output:\n<answer>\nA\n</answer>\n")

REPROMPT = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."
SOLUTION = "\nCorrect solution:\n\n{s}"
FEEDBACK = "\nThe following is feedback on your earlier attempt:\n\n{f}"


@dataclass(frozen=True)
class TutorPrompt:
    """The tutor's two-step anchoring instruction (our wording: the paper's is not published)."""
    system: str = ("You are a tutor reviewing a student's attempt at a multiple-choice science "
                   "question. You never reveal the final answer or an option letter.")
    user: str = (
        "Question:\n{question}\n\nStudent's attempt:\n{response}\n\n"
        "Review the attempt in two steps.\n"
        "1. Name the one technical concept of the question that your critique rests on, using the "
        "question's own words, inside <concept>...</concept>.\n"
        "2. Then write a short critique of the student's reasoning: what is wrong or missing and how "
        "to fix it. Do not state the final answer or any option letter.")


def student_user_message(question: str, options: Sequence[tuple[str, str]]) -> str:
    """The question, its options as 'A: text' lines, and the step-by-step cue (SDPO's format)."""
    lines = "\n".join(f"{label}: {text}" for label, text in options)
    return f"{question}\n\n{lines}\nPlease reason step by step."


def strip_think(text: str) -> str:
    """Remove <think>...</think> blocks (and a dangling opening one) from a response."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL)
    return re.sub(r"<think>.*", "", text, flags=re.DOTALL).strip()


def cap_tokens(text: str, tokenizer, max_tokens: int | None) -> str:
    """The first max_tokens tokens of text, decoded; applied before any chat templating."""
    if max_tokens is None:
        return text
    ids = tokenizer.encode(text, add_special_tokens=False)
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def reprompt_message(prompt: str, solution: str | None, feedback: str | None, tokenizer=None,
                     max_solution_tokens: int | None = None, max_feedback_tokens: int | None = None) -> str:
    """The teacher's user turn: the original prompt, a correct solution and feedback when present."""
    sol = ""
    if solution:
        s = strip_think(solution)
        if tokenizer is not None:
            s = cap_tokens(s, tokenizer, max_solution_tokens)
        sol = SOLUTION.format(s=s)
    fb = ""
    if feedback:
        f = cap_tokens(feedback, tokenizer, max_feedback_tokens) if tokenizer is not None else feedback
        fb = FEEDBACK.format(f=f)
    return REPROMPT.format(prompt=prompt, solution=sol, feedback=fb)


def messages(user: str, system: str | None = SYSTEM_PROMPT) -> list[dict[str, str]]:
    out = [{"role": "system", "content": system}] if system is not None else []
    return out + [{"role": "user", "content": user}]


def tutor_messages(question_text: str, response: str, template: TutorPrompt = TutorPrompt()) -> list[dict[str, str]]:
    return messages(template.user.format(question=question_text, response=strip_think(response)),
                    template.system)


def check_chat_template(tokenizer, where: str = "tokenizer") -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where} has no chat template: opcod renders every prompt through it")


def render(tokenizer, msgs: list[dict[str, str]], enable_thinking: bool = False) -> str:
    """Chat-templated text ending with the assistant header, thinking off unless asked for."""
    check_chat_template(tokenizer)
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=enable_thinking)


@dataclass(frozen=True)
class RationalePrompt:
    """App. D.1's SFT data: a model writes the reasoning that reaches a training problem's gold
    answer, given the problem and that answer (our wording: the paper's is not published). The
    response is then stored after the student's own prompt, which shows no answer."""
    system: str = ("You write worked solutions to multiple-choice science questions. You are told which option "
                   "is correct; write the reasoning a careful student would give to reach it on their own.")
    user: str = (
        "{prompt}\n\nThe correct option is {answer}: {answer_text}\n\n"
        "Write the step-by-step reasoning that leads to option {answer}, as if you were solving the question "
        "without being told the answer: never say that it was given to you. Respond in exactly this format:\n"
        "<reasoning>\n...\n</reasoning>\n<answer>\n{answer}\n</answer>")


def rationale_messages(prompt: str, answer: str, answer_text: str,
                       template: RationalePrompt = RationalePrompt()) -> list[dict[str, str]]:
    return messages(template.user.format(prompt=prompt, answer=answer, answer_text=answer_text), template.system)
