"""opcod.evaluate's avg@k on scripted answers, break-rate counting, and analyze on a real run."""
import json

import pytest

from opcod import synthetic
from opcod.analyze import break_rate, compare_runs, main as analyze_main
from opcod.engine_hf import Sampling
from opcod.evaluate import evaluate_model, format_scores


class ScriptedEngine:
    """Answers each prompt with a fixed response (a test of the metric, never a result)."""

    def __init__(self, tokenizer, answers):
        self.tokenizer, self.answers, self.calls = tokenizer, answers, 0

    def generate(self, prompts, sampling, seed):
        out = []
        for _ in prompts:
            out.append(self.tokenizer.encode(f"<answer>{self.answers[self.calls % len(self.answers)]}</answer>"))
            self.calls += 1
        return out


def test_evaluate_avg_at_k_on_scripted_answers(tokenizer):
    problems = {"physics": synthetic.generate("physics", 2, seed=0)}
    p0, p1 = problems["physics"]
    wrong0 = next(label for label, _ in p0.options if label != p0.answer)
    # k = 4: problem 0 right 3 of 4 times, problem 1 right once.
    wrong1 = next(label for label, _ in p1.options if label != p1.answer)
    engine = ScriptedEngine(tokenizer, [p0.answer, p0.answer, wrong0, p0.answer,
                                        wrong1, p1.answer, wrong1, wrong1])
    scores = evaluate_model(engine, tokenizer, problems, 4, Sampling(0.6, 0.95, 8))
    assert scores == {"physics": pytest.approx((0.75 + 0.25) / 2)}
    assert "50.0%" in format_scores({"m": scores})


def test_break_rate_counting_by_hand():
    pre = [[1, 1, 1, 1, 1, 1, 1, 1],   # 0 wrong: buckets 0-1 and 0-4
           [1, 0, 0, 0, 0, 0, 0, 0],   # 7 wrong: buckets 5-7 and 7
           [1, 1, 0, 0, 0, 0, 0, 1]]   # 5 wrong: bucket 5-7
    post = [[1, 0, 1, 1, 1, 1, 1, 0],  # 2 of 8 correct broke
            [0, 1, 1, 1, 1, 1, 1, 1],  # the only correct one broke
            [1, 1, 0, 0, 0, 0, 0, 1]]  # none broke
    r = break_rate(pre, post)
    assert r["overall"] == {"correct": 12, "broken": 3, "break_rate": 0.25}
    assert r["0-1"]["break_rate"] == 0.25 and r["0-4"]["break_rate"] == 0.25
    assert r["7"] == {"correct": 1, "broken": 1, "break_rate": 1.0}
    assert r["5-7"] == {"correct": 4, "broken": 1, "break_rate": 0.25}
    assert break_rate([[0, 0]], [[1, 1]])["overall"]["break_rate"] is None


def test_analyze_run_and_compare_on_a_real_run(demo_run, capsys):
    run_dir, _ = demo_run
    assert analyze_main(["run", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "anchoring outcomes" in out and "FB-on" in out and "SDPO-equivalent share" in out
    assert "round 1:" in out and (run_dir / "analysis" / "anchoring.png").is_file()
    report = json.loads((run_dir / "analysis" / "report.json").read_text())
    assert report["steps_fb_on"] + report["steps_fb_off"] == 8
    assert analyze_main(["compare", str(run_dir), str(run_dir)]) == 0
    cmp = compare_runs([run_dir, run_dir])
    for info in cmp["students"].values():  # a run never dominates an identical one
        assert all(not v for v in info["dominates"].values())
    assert analyze_main(["run", str(run_dir / "nope")]) == 2
