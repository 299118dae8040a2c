"""opcod.evaluate's avg@k on scripted answers, break- and fix-rate counting, and analyze on real runs and models."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from opcod import synthetic
from opcod.analyze import compare_runs, main as analyze_main
from opcod.effects import ARMS, Record, aggregate, buckets, effects, format_arms, format_table2
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


def test_evaluate_reads_a_truncated_answer_as_sdpo_does_unless_strict(tokenizer):
    """A response cut off after its answer letter (no </answer>) scores by default, as in SDPO's
    reading; with the strict option (grading.require_closing_tag / --require-closing-tag) it does not.
    Guards against evaluation grading stricter than training, or than SDPO."""
    from opcod.config import load_config
    problems = {"physics": synthetic.generate("physics", 1, seed=0)}
    p = problems["physics"][0]

    class Truncated:
        def generate(self, prompts, sampling, seed):
            return [tokenizer.encode(f"<reasoning>r</reasoning><answer>\n{p.answer}") for _ in prompts]
    assert evaluate_model(Truncated(), tokenizer, problems, 2, Sampling(0.6, 0.95, 8)) == {"physics": 1.0}
    assert evaluate_model(Truncated(), tokenizer, problems, 2, Sampling(0.6, 0.95, 8), strict=True) == {"physics": 0.0}
    assert load_config(overrides=["demo=true"]).grading.require_closing_tag is False
    assert load_config(overrides=["demo=true", "grading.require_closing_tag=true"]).grading.require_closing_tag


def _records(pre, post, domain="physics"):
    """Records of every rollout (all kept) from per-problem pre and per-arm post rewards."""
    out = []
    for i, rewards in enumerate(pre):
        wrong = sum(1 for x in rewards if x <= 0)
        for j, x in enumerate(rewards):
            out.append(Record(domain, wrong, x, {a: post[a][i][j] for a in post}))
    return out


def test_break_and_fix_rates_by_hand():
    pre = [[1, 1, 1, 1, 1, 1, 1, 1],   # 0 wrong: very easy (0-1) and easy (0-4)
           [1, 0, 0, 0, 0, 0, 0, 0],   # 7 wrong: hard (5-7) and hardest (7)
           [1, 1, 0, 0, 0, 0, 0, 1],   # 5 wrong: hard
           [0, 0, 0, 0, 0, 0, 0, 0]]   # 8 wrong: no correct rollout; fixes count in hard and hardest
    feedback = [[1, 0, 1, 1, 1, 1, 1, 0],  # 2 of 8 correct broke
                [0, 1, 1, 1, 1, 1, 1, 1],  # the only correct one broke, all 7 wrong fixed
                [1, 1, 0, 0, 0, 0, 0, 1],  # none broke, none fixed
                [1, 0, 0, 0, 0, 0, 0, 0]]  # 1 of 8 fixed
    nothing = [[1] * 8, [1] + [0] * 7, [1, 1, 0, 0, 0, 0, 0, 1], [0] * 8]  # no change at all
    r = effects(_records(pre, {"feedback": feedback, "nothing": nothing}), 8, arms=("feedback", "nothing"))
    assert set(r) == {"overall", "very easy (0-1)", "easy (0-4)", "hard (5-7)", "hardest (7)"}
    assert r["overall"]["feedback"] == {"correct": 12, "broken": 3, "break_rate": 0.25,
                                        "wrong": 20, "fixed": 8, "fix_rate": 0.4}
    assert r["overall"]["nothing"]["break_rate"] == 0 and r["overall"]["nothing"]["fix_rate"] == 0
    assert r["very easy (0-1)"]["feedback"]["break_rate"] == 0.25 == r["easy (0-4)"]["feedback"]["break_rate"]
    assert r["hardest (7)"]["feedback"] == {"correct": 1, "broken": 1, "break_rate": 1.0,
                                            "wrong": 15, "fixed": 8, "fix_rate": 8 / 15}
    assert r["hard (5-7)"]["feedback"]["break_rate"] == 0.25 and r["hard (5-7)"]["feedback"]["wrong"] == 20
    assert effects(_records([[0, 0]], {"feedback": [[1, 1]]}), 2, arms=("feedback",))["overall"]["feedback"][
        "break_rate"] is None
    assert list(buckets(16)) == ["very easy (0-2)", "easy (0-8)", "hard (9-15)", "hardest (15)"]


def test_step_counts_add_over_ranks_and_steps_to_the_pooled_rates():
    """What a run logs per step (counts summed over ranks) gives the rates of the pooled records,
    and survives the step record's names."""
    from opcod.effects import rates, rates_of_counts, step_counts
    from opcod.metrics import effect_counts, effect_metrics
    recs = _records([[1, 1, 0, 0], [0, 0, 0, 1], [1, 0, 1, 1]],
                    {"feedback": [[1, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0]],
                     "solution": [[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 1, 1]],
                     "nothing": [[0, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 1]]})
    parts = [step_counts(recs[:5]), step_counts(recs[5:9]), step_counts(recs[9:])]   # ranks or steps
    summed = {k: sum(p[k] for p in parts) for k in parts[0]}
    # by hand, feedback arm: 6 correct, 2 broke (the second and the last); 6 wrong, 5 fixed
    assert rates_of_counts(summed, "feedback") == {"correct": 6, "broken": 2, "break_rate": 2 / 6,
                                                   "wrong": 6, "fixed": 5, "fix_rate": 5 / 6}
    for arm in ARMS:
        assert rates_of_counts(summed, arm) == rates(recs, arm)
    logged = effect_metrics(summed)
    assert logged["opcod/effects/nothing/break_rate"] == rates(recs, "nothing")["break_rate"]
    assert effect_counts(logged) == summed and effect_counts({"kind": "step"}) is None
    assert effect_metrics(None) == {}
    none = rates_of_counts(step_counts([]), "feedback")
    assert none["break_rate"] is None and none["fix_rate"] is None


def test_reanswer_gives_each_arm_its_context_and_grades_only_kept_rollouts(tokenizer):
    """The feedback arm's prompt is the training teacher's prompt; the solution arm drops the
    feedback, the nothing arm both; rollouts whose feedback was not kept are not re-answered."""
    from opcod.step import Rollout, reanswer, teacher_contexts
    p = synthetic.generate("chemistry", 1, seed=3)[0]
    wrong = next(label for label, _ in p.options if label != p.answer)
    critique = "Recall the group of this element and what that group is called."
    rollouts = [Rollout(p, [1], [2], f"<answer>{a}</answer>", float(a == p.answer), solution=p.solution,
                        feedback=critique if outcome == "kept" else None, outcome=outcome)
                for a, outcome in ((wrong, "kept"), (p.answer, "kept"), (wrong, "no_match"))]
    seen = []

    def generate(prompts):   # answers right exactly when the critique is in context
        seen.append([tokenizer.decode(x) for x in prompts])
        return [tokenizer.encode(f"<answer>{p.answer if critique in t else wrong}</answer>") for t in seen[-1]]
    post = reanswer(rollouts, generate, tokenizer, 512, 512)
    assert list(post) == list(ARMS) and all(set(v) == {0, 1} for v in post.values())
    assert post["feedback"] == {0: 1.0, 1: 1.0} and post["solution"] == post["nothing"] == {0: 0.0, 1: 0.0}
    teacher_contexts(rollouts, tokenizer, 512, 512)
    assert seen[0][0] == tokenizer.decode(rollouts[0].teacher_prompt_ids)
    assert p.solution in seen[1][0] and critique not in seen[1][0]
    assert p.solution not in seen[2][0] and critique not in seen[2][0] and p.prompt in seen[2][0]


def test_pairs_aggregate_by_cognizance_and_the_tutors_stronger_domain():
    same = {a: [[1, 1, 0, 0]] for a in ARMS}
    broke = {**same, "feedback": [[0, 1, 0, 0]]}
    def pair(cognizant, stronger, recs):
        return {"tutor": {"cognizant": cognizant, "stronger_domains": stronger}, "records": recs}
    pairs = [pair(True, ["physics"], _records([[1, 1, 0, 0]], same, "physics")),
             pair(True, ["physics"], _records([[1, 1, 0, 0]], broke, "chemistry")),
             pair(False, ["chemistry"], _records([[1, 1, 0, 0]], broke, "chemistry"))]
    agg = aggregate(pairs, 4)
    assert agg["cognizant"]["pairs"] == 2 and agg["incognizant"]["pairs"] == 1
    assert agg["cognizant"]["overall"]["feedback"]["break_rate"] == 1 / 4   # pooled: 1 of 4 correct broke
    assert agg["cognizant"]["tutor's stronger domain"]["feedback"]["break_rate"] == 0   # physics only
    assert agg["incognizant"]["tutor's stronger domain"]["feedback"]["break_rate"] == 1 / 2
    assert agg["cognizant"]["tutor's weaker domain"]["feedback"]["break_rate"] == 1 / 2   # chemistry only
    assert agg["cognizant"]["tutor's weaker domain"]["solution"]["break_rate"] == 0
    assert agg["incognizant"]["tutor's weaker domain"]["feedback"]["correct"] == 0   # it has no weaker one here
    table = format_table2(agg, 4)
    assert "very easy (0-1)" in table and "25.0% (1/4)" in table and "50.0% (1/2)" in table
    arms = format_arms(agg)
    assert "solution" in arms and "fix-rate" in arms
    assert [line.split()[-4] for line in arms.splitlines() if line.startswith("cognizant") and "weaker" in line] \
        == ["50.0%", "0.0%", "0.0%"]   # the break-rates of feedback, solution and nothing there


def test_break_rate_pools_a_tutor_as_the_gate_would_at_the_threshold(tokenizer):
    """analyze's break-rate pooling and the training gate decide cognizance with one function: a
    tutor whose gap equals tau on paper ((1.0 - 0.7) / 1.0 = 0.30000000000000004 at tau 0.3) is
    cognizant in both. Guards against the two disagreeing at the threshold (analyze had gap <= tau,
    the gate gap <= tau + 1e-12)."""
    from opcod.analyze import measure_pair
    from opcod.config import load_config
    from opcod.gating import cognizant
    cfg = load_config(overrides=["demo=true", "tau=0.3"])
    problems = synthetic.generate("physics", 1, seed=0)
    p = problems[0]
    engines = {"tutee": ScriptedEngine(tokenizer, [p.answer]), "tutor": ScriptedEngine(tokenizer, ["A"])}
    for tutor_scores, expected in (({"chemistry": 0.7, "physics": 1.0}, True),     # gap = tau on paper
                                   ({"chemistry": 0.69, "physics": 1.0}, False)):  # gap 0.31
        scores = {"tutee": {"chemistry": 1.0, "physics": 0.0}, "tutor": tutor_scores}
        out = measure_pair(cfg, engines, tokenizer, "tutee", "tutor", problems, {}, 2, 0, scores=dict(scores))
        assert out["tutor"]["cognizant"] is expected
        assert cognizant(scores, cfg.tau)["tutor"] is expected   # the gate's verdict


class QueueEngine:
    """Answers each call from a queue of per-prompt answers, and records the prompts it was given."""

    def __init__(self, tokenizer, calls, wrap=lambda a: f"<answer>{a}</answer>"):
        self.tokenizer, self.calls, self.wrap, self.seen = tokenizer, list(calls), wrap, []

    def generate(self, prompts, sampling, seed):
        answers = self.calls.pop(0)
        assert len(answers) == len(prompts), (answers, len(prompts))
        self.seen.append([self.tokenizer.decode(x) for x in prompts])
        return [self.tokenizer.encode(self.wrap(a)) for a in answers]


def test_break_rate_counts_only_rollouts_whose_feedback_was_kept_by_hand(tokenizer):
    """measure_pair on 2 problems x n = 2 rollouts, the tutor's feedback kept on rollouts 0 and 2
    only (no_match on the others), re-answers scripted per arm: by hand, in the feedback arm rollout
    0 (correct) breaks and rollout 2 (wrong) is fixed. Guards against counting rollouts whose feedback
    was not kept (4 records instead of 2) and against re-answers landing on the wrong rollout; the
    tutee must have been asked each problem n times, in order."""
    from opcod.analyze import measure_pair
    from opcod.config import load_config
    cfg = load_config(overrides=["demo=true"])
    problems = synthetic.generate("physics", 2, seed=0)
    p0, p1 = problems
    right = [p.answer for p in problems]
    wrong = [next(label for label, _ in p.options if label != p.answer) for p in problems]
    tutee = QueueEngine(tokenizer, [
        [right[0], wrong[0], wrong[1], wrong[1]],    # rollouts: rewards 1, 0, 0, 0
        [wrong[0], right[1]],                         # feedback arm, rollouts 0 and 2: broke, fixed
        [right[0], wrong[1]],                         # solution arm: no change
        [right[0], wrong[1]]])                        # nothing arm: no change
    ungrounded = "<concept>entropy of mixing</concept> Think again about it."
    tutor = QueueEngine(tokenizer, [[p0.meta["feedback"], ungrounded, p1.meta["feedback"], ungrounded]],
                        wrap=lambda a: a)
    scores = {"tutee": {"physics": 1.0}, "tutor": {"physics": 0.5}}
    out = measure_pair(cfg, {"tutee": tutee, "tutor": tutor}, tokenizer, "tutee", "tutor", problems, {}, 2, 0,
                       scores=scores)
    assert out["feedback_outcomes"]["kept"] == 2 and out["feedback_outcomes"]["no_match"] == 2
    assert [(r.pre, r.post) for r in out["records"]] == [
        (1.0, {"feedback": 0.0, "solution": 1.0, "nothing": 1.0}),
        (0.0, {"feedback": 1.0, "solution": 0.0, "nothing": 0.0})]
    assert [r.wrong for r in out["records"]] == [1, 2]          # wrong rollouts of each one's problem
    overall = effects(out["records"], 2)["overall"]["feedback"]
    assert (overall["correct"], overall["broken"], overall["wrong"], overall["fixed"]) == (1, 1, 1, 1)
    first = tutee.seen[0]
    assert out["rollouts"] == 4 and [p0.prompt in t for t in first] == [True, True, False, False]
    assert all(p1.prompt in t for t in first[2:])
    assert tutor.calls == [] and tutee.calls == []               # nothing asked twice, nothing skipped


def test_compare_runs_dominance_by_hand(tmp_path):
    """Four runs' final scores against one initial student: fast dominates same_a and same_b (>= on
    both domains, > on x); same_a and same_b hold equal scores in different directories, so neither
    dominates the other; skewed trades y for x and neither dominates nor is dominated by fast.
    Guards against a non-strict dominance (equal runs dominating each other) and against runs
    collapsing into one (the old test compared a run with itself, keyed twice by one path)."""
    initial = {"x": 0.5, "y": 0.4}
    finals = {"fast": {"x": 0.6, "y": 0.5}, "same_a": {"x": 0.5, "y": 0.5}, "same_b": {"x": 0.5, "y": 0.5},
              "skewed": {"x": 0.7, "y": 0.3}}
    dirs = []
    for name, final in finals.items():
        d = tmp_path / name
        d.mkdir()
        (d / "summary.json").write_text(json.dumps({"students": {"s": {"initial": initial, "final": final}}}))
        dirs.append(d)
    info = compare_runs(dirs)["students"]["s"]
    short = {str(d): d.name for d in dirs}
    assert {short[r]: sorted(short[b] for b in bs) for r, bs in info["dominates"].items()} == {
        "fast": ["same_a", "same_b"], "same_a": [], "same_b": [], "skewed": []}
    assert {short[r]: v for r, v in info["improves_on_initial"].items()} == {
        "fast": True, "same_a": True, "same_b": True, "skewed": False}
    with pytest.raises(ValueError, match="more than once"):
        compare_runs([dirs[0], dirs[1], tmp_path / "fast"])


def test_token_signal_by_hand_where_the_jsd_saturates():
    """Two classes: in row 0 the student is 0.99 sure of one and the teacher 0.999 of the other, in
    row 1 they differ a little. Values and gradients by hand: forward KL's gradient on the student's
    logits is q - p; the beta-JSD's is q * (g - E_q g) with g = (1 - beta) log(q / m),
    m = beta p + (1 - beta) q (P the teacher, Q the student)."""
    import math

    import torch

    from opcod.token_signal import summarize, token_signal
    q_rows, p_rows = [[0.99, 0.01], [0.7, 0.3]], [[0.001, 0.999], [0.6, 0.4]]
    student = torch.tensor([[math.log(x) for x in q] for q in q_rows], dtype=torch.float64)
    teacher = torch.tensor([[math.log(x) for x in p] for p in p_rows], dtype=torch.float64)

    def by_hand(p, q, beta):
        m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
        div = beta * sum(a * math.log(a / c) for a, c in zip(p, m)) + \
            (1 - beta) * sum(b * math.log(b / c) for b, c in zip(q, m))
        g = [(1 - beta) * math.log(b / c) for b, c in zip(q, m)]
        eg = sum(b * x for b, x in zip(q, g))
        return div, math.hypot(*[b * (x - eg) for b, x in zip(q, g)])
    for beta in (0.5, 0.2):
        (d0, g0), (d1, _) = by_hand(p_rows[0], q_rows[0], beta), by_hand(p_rows[1], q_rows[1], beta)
        kl0 = math.hypot(*[b - a for a, b in zip(p_rows[0], q_rows[0])])
        sig = token_signal(student, teacher, beta=beta)
        assert sig["tokens"] == 2 and sig["largest_token"] == 0 and d1 > 1e-3
        assert sig["largest"] == pytest.approx(d0, rel=1e-9) and sig["divergence"] == pytest.approx(d0 + d1, rel=1e-9)
        assert sig["gradient"] == pytest.approx(g0, rel=1e-9)
        assert sig["gradient_vs_forward_kl"] == pytest.approx(g0 / kl0, rel=1e-9)
        assert sig["gradient_vs_forward_kl"] < 0.05   # saturated: under a twentieth of KL's pull
    assert token_signal(student, teacher, beta=0.0)["gradient_vs_forward_kl"] == pytest.approx(1.0)
    sig = token_signal(student, teacher, beta=0.5)
    same = token_signal(student, student, beta=0.5)   # nothing to compare: no ratio, no error
    assert same["divergence"] == pytest.approx(0, abs=1e-12) and same["gradient_vs_forward_kl"] is None
    summary = summarize([{"correct": False, **sig}, {"correct": False, **sig}, {"correct": True, **same}])
    assert summary["wrong"]["rollouts"] == 2
    assert summary["wrong"]["largest_share"] == pytest.approx(sig["largest"] / sig["divergence"])
    assert summary["right"]["rollouts"] == 1 and summary["right"]["gradient_vs_forward_kl"] is None


def test_rollout_logits_are_the_rows_that_predict_each_response_token():
    import torch

    from opcod.token_signal import rollout_logits

    class Echo(torch.nn.Module):  # row i of the logits names token i of the input
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, ids, logits_to_keep=0):
            logits = torch.nn.functional.one_hot(ids, 10).float()
            return type("Out", (), {"logits": logits[:, -logits_to_keep:] if logits_to_keep else logits})()
    rows = rollout_logits(Echo(), [1, 2, 3], [4, 5])
    assert rows.dtype == torch.float64 and rows.argmax(-1).tolist() == [3, 4]


def test_break_rate_cli_over_pairs_of_demo_students(demo_run, demo_env, tmp_path):
    """Both directions of the demo pair, n = 4 (not the paper's 8): the buckets follow n, every arm
    re-answers the same kept rollouts, and the JSON holds what the table printed."""
    from opcod.demo import VERSION
    cache = Path(demo_env["OPCOD_CACHE"]) / f"demo-{VERSION}"
    chem, phys = cache / "chem_student", cache / "phys_student"
    out = tmp_path / "br.json"
    import yaml

    from opcod.train import DEFAULT_CONFIG
    config = yaml.safe_load(Path(DEFAULT_CONFIG).read_text())
    config["data"]["val_size"], config["val_k"] = 8, 2   # the cognizance verdicts from fewer samples: faster
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    res = subprocess.run([sys.executable, "-m", "opcod.analyze", "break-rate", "--pairs", f"{chem}:{phys}",
                          f"{phys}:{chem}", "--n", "4", "--limit", "3", "--config", str(tmp_path / "c.yaml"),
                          "--out", str(out), "--signal"],
                         capture_output=True, text=True, timeout=900, env=demo_env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "very easy (0-1)" in res.stdout and "easy (0-2)" in res.stdout and "tutor's stronger domain" in res.stdout
    result = json.loads(out.read_text())
    assert result["n"] == 4 and len(result["pairs"]) == 2
    for p in result["pairs"]:
        # (what counts as a record, by hand: test_break_rate_counts_only_rollouts_whose_feedback_was_kept_by_hand)
        assert set(p["effects"]["overall"]) == set(ARMS)
        kept = p["feedback_outcomes"]["kept"]
        # --signal: one record per rollout with kept feedback, of the tutee as its own teacher.
        assert len(p["signal"]) == kept and all(s["divergence"] >= 0 for s in p["signal"])
        assert all(0 <= s["largest_token"] < s["tokens"] for s in p["signal"])
    signal = result["signal"]
    assert signal["beta"] == 0.5 and "distillation signal (exact loss at beta 0.5" in res.stdout
    assert sum(signal[k]["rollouts"] for k in ("wrong", "right")) == sum(len(p["signal"]) for p in result["pairs"])
    agg = result["aggregate"]
    assert agg["cognizant"]["pairs"] + agg["incognizant"]["pairs"] == 2
    bad = subprocess.run([sys.executable, "-m", "opcod.analyze", "break-rate", "--pairs", str(chem)],
                         capture_output=True, text=True, timeout=120, env=demo_env)
    assert bad.returncode == 2 and "TUTEE:TUTOR" in bad.stderr


def test_analyze_run_and_compare_on_a_real_run(demo_run, capsys):
    run_dir, _ = demo_run
    assert analyze_main(["run", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "anchoring outcomes" in out and "FB-on" in out and "SDPO-equivalent share" in out
    assert "round 1:" in out and (run_dir / "analysis" / "anchoring.png").is_file()
    report = json.loads((run_dir / "analysis" / "report.json").read_text())
    assert report["steps_fb_on"] + report["steps_fb_off"] == 8
    # feedback effects: one row per arm for every phase that measured them, summed over its steps
    assert "feedback effects" in out and "fix-rate" in out
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"kind": "step"' in x]
    assert len(report["feedback_effects"]) == 4
    for e in report["feedback_effects"]:
        phase = [s for s in steps if (s["opcod/round"], s["opcod/tutee"]) == (e["round"], e["tutee"])]
        for arm, r in e["arms"].items():
            assert r["correct"] == sum(s["opcod/effects/correct"] for s in phase)
            assert r["fixed"] == sum(s[f"opcod/effects/{arm}/fixed"] for s in phase)
    assert analyze_main(["compare", str(run_dir), str(run_dir)]) == 2   # the same run twice: refused
    assert analyze_main(["run", str(run_dir / "nope")]) == 2


def test_hint_distribution_is_the_models_own_sequence_probability_renormalized(tokenizer):
    """Each hint's probability against transformers' own loss on the whole sequence (another code
    path: labels, shift and mean; it computes in float32, hence the tolerance), for the student's
    prompt and for the self-teacher's."""
    import math

    import torch
    from transformers import Qwen3ForCausalLM

    from opcod import prompts
    from opcod.hints import hint_distribution
    from opcod.tiny import tiny_config
    torch.manual_seed(0)
    cfg = tiny_config(len(tokenizer))
    cfg.pad_token_id = tokenizer.pad_token_id
    model = Qwen3ForCausalLM(cfg).double().eval()
    for problem, teacher in [(p, t) for p in (synthetic.generate("chemistry", 1, seed=3)[0],
                                              synthetic.generate("physics", 1, seed=3)[0]) for t in (False, True)]:
        critique = problem.meta["feedback"].split("</concept>", 1)[1].strip()
        user = prompts.reprompt_message(problem.prompt, None, critique) if teacher else problem.prompt
        # The right hint is scored as the tokens that open the worked solution SFT trains on.
        right = tokenizer.encode(f"<reasoning>\n{synthetic.reasoning_lines(problem.meta['family'])[problem.answer]}\n",
                                 add_special_tokens=False)
        assert tokenizer.encode(problem.solution, add_special_tokens=False)[:len(right)] == right
        context = tokenizer.encode(prompts.render(tokenizer, prompts.messages(user)), add_special_tokens=False)
        want = {}
        for letter, line in synthetic.reasoning_lines(problem.meta["family"]).items():
            response = tokenizer.encode(f"<reasoning>\n{line}\n", add_special_tokens=False)
            ids = torch.tensor([context + response])
            labels = torch.tensor([[-100] * len(context) + response])
            with torch.no_grad():
                want[letter] = -model(ids, labels=labels).loss.item() * len(response)
        z = math.log(sum(math.exp(v) for v in want.values()))
        got = hint_distribution(model, tokenizer, problem, teacher=teacher)
        assert list(got) == list("ABCD") and sum(got.values()) == pytest.approx(1.0, abs=1e-12)
        for letter in got:
            assert got[letter] == pytest.approx(math.exp(want[letter] - z), rel=1e-4)


def test_hints_summary_by_hand():
    """Two families. In f, item x's two questions get other distributions (their mean is its row)
    and item y that mean (spread 0); in g, both items get one distribution, whose likeliest hint
    is wrong for u and right for v (spread 0), and then v another (spread 0.25)."""
    import math

    from opcod.data import Problem
    from opcod.hints import summarize

    def q(family, item, answer):
        return Problem(f"{family}-{item}-{answer}", "chemistry", "?", [], answer, meta={"family": family, "item": item})
    problems = [q("f", "x", "A"), q("f", "x", "A"), q("f", "y", "B"), q("g", "u", "C"), q("g", "v", "D")]
    dists = [{"A": 0.8, "B": 0.2, "C": 0.0, "D": 0.0}, {"A": 0.2, "B": 0.8, "C": 0.0, "D": 0.0},
             {"A": 0.5, "B": 0.5, "C": 0.0, "D": 0.0}, {"A": 0.0, "B": 0.0, "C": 0.25, "D": 0.75},
             {"A": 0.0, "B": 0.0, "C": 0.25, "D": 0.75}]
    s = summarize(problems, dists)
    assert s["questions"] == 5
    assert s["p_right"] == pytest.approx((0.8 + 0.2 + 0.5 + 0.25 + 0.75) / 5)
    assert s["p_top"] == pytest.approx((0.8 + 0.8 + 0.5 + 0.75 + 0.75) / 5)
    h = lambda *ps: -sum(x * math.log(x) for x in ps)  # noqa: E731
    assert s["entropy"] == pytest.approx((2 * h(0.8, 0.2) + h(0.5, 0.5) + 2 * h(0.25, 0.75)) / 5)
    assert s["top_right"] == 1 + 0 + 0 + 0 + 1   # the first of two equal letters counts as the likeliest
    rows = {(r["family"], r["item"]): r for r in s["items"]}
    assert rows["f", "x"]["distribution"] == pytest.approx({"A": 0.5, "B": 0.5, "C": 0.0, "D": 0.0})
    assert (rows["f", "x"]["questions"], rows["f", "x"]["answer"], rows["g", "v"]["answer"]) == (2, "A", "D")
    assert s["spread"] == pytest.approx({"f": 0.0, "g": 0.0})
    s = summarize(problems[3:], [dists[3], {"A": 0.0, "B": 0.0, "C": 0.0, "D": 1.0}])
    assert s["spread"] == pytest.approx({"g": 0.25})


def test_hints_cli_on_the_demo_students(demo_run, demo_env, tmp_path):
    import yaml

    from opcod.demo import VERSION
    from opcod.train import DEFAULT_CONFIG
    cache = Path(demo_env["OPCOD_CACHE"]) / f"demo-{VERSION}"
    out = tmp_path / "hints.json"

    def hints(*args):
        return subprocess.run([sys.executable, "-m", "opcod.analyze", "hints", "--student", str(cache / "chem_student"),
                               *args], capture_output=True, text=True, timeout=600, env=demo_env)
    res = hints("--domain", "chemistry", "--teacher", "--out", str(out))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result) == {"student", "teacher"} and "spread between items" in res.stdout
    for s in result.values():
        assert s["questions"] == 61 == sum(r["questions"] for r in s["items"])  # the default's specialist ones
        assert all(sum(r["distribution"].values()) == pytest.approx(1.0) for r in s["items"])
    # The chemistry student learned its specialist facts in its SFT: it tells its items apart,
    # and as its self-teacher it reads the hint its context opens with.
    assert result["student"]["p_right"] > 0.5 and min(result["student"]["spread"].values()) > 0.5
    assert result["teacher"]["p_right"] > 0.9
    bad = hints("--domain", "biology")
    assert bad.returncode == 2 and "--domain 'biology': no train questions" in bad.stderr
    config = yaml.safe_load(Path(DEFAULT_CONFIG).read_text())
    config["data"]["val_size"] = 1   # one validation question per domain: a common one
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    empty = hints("--domain", "chemistry", "--split", "validation", "--config", str(tmp_path / "c.yaml"))
    assert empty.returncode == 2 and "no specialist questions in its validation split (1 in all)" in empty.stderr
