"""The paper's pipeline on small inputs: models by Hugging Face Hub id from a pre-filled cache
(offline), SFT rationales (App. D.1) from a local tiny model and from an OpenAI-compatible endpoint,
and the paper-setting quick start command by command with the paper's configs."""
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from conftest import ENV, SHARED, torchrun

ROOT = Path(__file__).parent.parent
SKE = Path(SHARED) / "data" / "sciknoweval"


def _run(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env or ENV, cwd=ROOT)


# ----------------------------------------------------------------------------- tiny models, by Hub id

RESPONSE = "<reasoning>\nThe table gives it.\n</reasoning>\n<answer>\nA\n</answer>"


def answering_model(path: Path, tokenizer, hidden: int = 32):
    """A tiny Qwen3 built offline that answers every question with RESPONSE (option A), then stops:
    its layers add nothing to the residual stream and its LM head maps the chat template's last
    token to RESPONSE (one added token) and RESPONSE to the end of turn. Its rationales are right
    exactly on the problems whose gold answer is A, which this file checks against."""
    import torch
    from transformers import AutoModelForCausalLM
    from tokenizers import AddedToken

    from opcod import prompts
    from opcod.tiny import create_model_dir, tiny_config
    tok = tokenizer
    if RESPONSE not in tok.get_vocab():
        tok.add_tokens([AddedToken(RESPONSE, normalized=False, special=False)])
    create_model_dir(path, tok, tiny_config(len(tok), hidden=hidden, intermediate=2 * hidden, tie=False), seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    last = tok.encode(prompts.render(tok, prompts.messages("x")), add_special_tokens=False)[-1]
    answer = tok.convert_tokens_to_ids(RESPONSE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        head.zero_()
        emb[last], emb[answer] = 0.0, 0.0
        emb[last, 0], emb[answer, 1] = 1.0, 1.0
        head[answer, 0] = 50.0
        head[tok.eos_token_id, 1] = 50.0
    model.save_pretrained(path, safe_serialization=True)
    return path


def hub_cache(cache: Path, repo: str, folder: Path, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """Lay `folder` out in a Hugging Face Hub cache as the Hub client does: blobs named by content,
    the snapshot of `commit` linking to them, refs/main naming the commit."""
    store = cache / ("models--" + repo.replace("/", "--"))
    snap = store / "snapshots" / commit
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.is_file():
            data = f.read_bytes()
            blob = store / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (store / "refs").mkdir(exist_ok=True)
    (store / "refs" / "main").write_text(commit)
    return snap


@pytest.fixture(scope="module")
def tiny_hub(tmp_path_factory):
    """A Hub cache holding opcod-test/answers-a (answering_model) and opcod-test/random (a random tiny
    Qwen3 with the same tokenizer), and an environment that reads it offline."""
    from opcod import prompts, synthetic
    from opcod.tiny import build_tokenizer, create_model_dir, tiny_config
    root = tmp_path_factory.mktemp("hub")
    corpus = []
    for d in synthetic.SYNTHETIC_DOMAINS:
        for p in synthetic.generate(d, 30, seed=0):
            corpus += [prompts.SYSTEM_PROMPT, p.prompt, p.solution, prompts.RationalePrompt.user]
    tok = build_tokenizer(corpus * 2, vocab_size=400)
    answering_model(root / "answers-a", tok)
    create_model_dir(root / "random", tok, tiny_config(len(tok), hidden=32, intermediate=64, tie=False), seed=3)
    cache = root / "cache"
    snaps = {name: hub_cache(cache, f"opcod-test/{name}", root / name) for name in ("answers-a", "random")}
    env = {**ENV, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return root, snaps, env


def test_hub_ids_resolve_from_the_cache_offline_in_plan_and_the_download_command(tiny_hub, tmp_path):
    root, snaps, env = tiny_hub
    res = _run("-m", "opcod.hub", "download", "opcod-test/random", env=env)
    assert res.returncode == 0 and res.stdout.strip() == str(snaps["random"]), res.stderr
    commit = snaps["random"].name
    res = _run("-m", "opcod.hub", "download", f"opcod-test/random@{commit}", env=env)   # a pinned revision
    assert res.returncode == 0 and res.stdout.strip() == str(snaps["random"]), res.stderr
    res = _run("-m", "opcod.hub", "download", "opcod-test/absent", env=env)
    assert res.returncode == 2 and "models[0]: 'opcod-test/absent'" in res.stderr and "HF_HUB_OFFLINE=1" in res.stderr
    res = _run("-m", "opcod.plan", "--config", ROOT / "configs" / "phys_chem.yaml", "students.0.path=opcod-test/random",
               "--gpu-gib", "80", "students.1.path=opcod-test/answers-a", env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1].endswith("of 80 GiB")
    assert f"students.0.path: opcod-test/random -> {snaps['random']}" in res.stderr
    res = _run("-m", "opcod.plan", "--config", ROOT / "configs" / "phys_chem.yaml", "students.0.path=opcod-test/nope",
               "students.1.path=opcod-test/random", env=env)
    assert res.returncode == 2 and "students.0.path: 'opcod-test/nope' is neither a local folder" in res.stderr


def test_what_counts_as_a_hub_id(tmp_path, monkeypatch):
    from opcod.hub import hub_id
    monkeypatch.chdir(tmp_path)
    assert hub_id("Qwen/Qwen3-8B") == ("Qwen/Qwen3-8B", None)
    assert hub_id("Qwen/Qwen3-8B@refs/pr/1") == ("Qwen/Qwen3-8B", "refs/pr/1")
    for local in ("./Qwen/Qwen3-8B", "/models/x", "~/x/y", "runs/r/students/A", "model", ""):
        assert hub_id(local) is None, local
    (tmp_path / "models" / "qwen3-8b-physics").mkdir(parents=True)   # a folder that exists wins
    assert hub_id("models/qwen3-8b-physics") is None and hub_id("models/qwen3-8b-chemistry") is not None


# ----------------------------------------------------------------------------- opcod.rationales

def _synthetic_config(path: Path) -> Path:
    path.write_text(yaml.safe_dump({"data": {"source": "synthetic", "val_size": 4, "synthetic_train": 12,
                                             "synthetic_test": 4}, "engine": {"kind": "hf"}}))
    return path


def test_rationales_from_a_local_tiny_model_by_hub_id_resume_and_feed_sft(tiny_hub, tmp_path):
    """End to end on CPU: the hf engine samples (greedy) a rationale per training problem, the
    grader keeps exactly the problems whose gold answer is A, a rerun asks nothing again, and
    `opcod.sft --config configs/sft/chemistry.yaml` fine-tunes on what was kept."""
    from opcod.config import load_config
    from opcod.rationales import dropped_path, training_problems
    root, snaps, env = tiny_hub
    cfg_path = _synthetic_config(tmp_path / "data.yaml")
    out = tmp_path / "sft" / "chemistry.jsonl"
    args = ["-m", "opcod.rationales", "--config", cfg_path, "--domain", "chemistry", "--model", "opcod-test/answers-a",
            "--out", out, "--temperature", "0", "--max-new-tokens", "4", "--batch-size", "5"]
    res = _run(*args[:-2], "--limit", "7", "--batch-size", "5", env=env)   # the first 7 problems, then all 12
    assert res.returncode == 0, res.stderr[-3000:]
    res = _run(*args, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    problems = training_problems(load_config(str(cfg_path), ["demo=true", "data.domains=[chemistry]"]), "chemistry")
    assert len(problems) == 12   # synthetic_train (the validation problems are drawn besides)
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    dropped = [json.loads(x) for x in dropped_path(out).read_text().splitlines()]
    assert kept and dropped
    assert sorted(r["id"] for r in kept) == sorted(p.id for p in problems if p.answer == "A")
    assert sorted(r["id"] for r in dropped) == sorted(p.id for p in problems if p.answer != "A")
    assert all(r["response"] == RESPONSE and r["messages"][-1]["content"] == next(
        p.prompt for p in problems if p.id == r["id"]) for r in kept)
    assert all(r["extracted"] == "A" for r in dropped)
    assert "done before 7" in res.stdout and f"holds {len(kept)} rationales" in res.stdout
    # a killed run's half-written last line is cut and its problem asked again; finished ones are not
    with open(out, "a") as f:
        f.write('{"id": "chemistry-half", "dom')
    res = _run(*args, env=env)
    assert res.returncode == 0 and "half-written" in res.stderr and "kept 0, dropped 0" in res.stdout
    assert [json.loads(x) for x in out.read_text().splitlines()] == kept
    # another domain into the same file is refused by name
    res = _run(*[a if a != "chemistry" else "physics" for a in args], env=env)
    assert res.returncode == 2 and "'chemistry' problem, but --domain is 'physics'" in res.stderr
    # the SFT of App. D.1 on these records, with the paper's config and the base model by Hub id
    res = torchrun("-m", "opcod.sft", "--config", ROOT / "configs" / "sft" / "chemistry.yaml", f"data={out}",
                   "model=opcod-test/random", f"output={tmp_path / 'student'}", "epochs=1", "batch_size=2",
                   "max_tokens=512", nproc=1, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    saved = yaml.safe_load((tmp_path / "student" / "sft_config.yaml").read_text())
    assert saved["model"] == str(snaps["random"]) and saved["lora_rank"] == 8 and saved["lr"] == 2e-4
    assert (tmp_path / "student" / "model.safetensors").is_file()


class _Stub(BaseHTTPRequestHandler):
    """An OpenAI-compatible /v1/chat/completions: answers the option it is told is correct when the
    question's number is even, option Z otherwise; the first request gets a 503 (retried)."""
    requests: list = []
    fail_next = True

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if type(self).fail_next:
            type(self).fail_next = False
            self.send_response(503)
            self.end_headers()
            return
        user = body["messages"][-1]["content"]
        gold = user.split("The correct option is ", 1)[1][0]
        letter = gold if int(hashlib.sha256(user.encode()).hexdigest(), 16) % 2 == 0 else "Z"
        reply = {"choices": [{"message": {"role": "assistant",
                                          "content": f"<reasoning>\nBecause.\n</reasoning>\n<answer>\n{letter}\n</answer>"}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_rationales_from_an_openai_compatible_endpoint(tmp_path, monkeypatch, capsys):
    from opcod import rationales
    from opcod.config import load_config
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(rationales.EndpointGenerator, "BACKOFF_S", 0.01)   # retry at once
    monkeypatch.setenv("OPCOD_TEST_KEY", "sk-test")
    try:
        cfg_path = _synthetic_config(tmp_path / "data.yaml")
        out = tmp_path / "physics.jsonl"
        argv = ["--config", str(cfg_path), "--domain", "physics", "--model", "gpt-test", "--out", str(out),
                "--base-url", f"http://127.0.0.1:{server.server_port}/v1", "--api-key-env", "OPCOD_TEST_KEY",
                "--max-new-tokens", "256", "--seed", "5"]
        assert rationales.main(argv) == 0
    finally:
        server.shutdown()
    problems = rationales.training_problems(load_config(str(cfg_path), ["demo=true", "data.domains=[physics]"]),
                                            "physics")
    reqs = _Stub.requests
    assert len(reqs) == len(problems) + 1   # one 503, retried
    assert all(r["path"] == "/v1/chat/completions" and r["auth"] == "Bearer sk-test" for r in reqs)
    body = reqs[-1]["body"]
    assert body["model"] == "gpt-test" and body["max_completion_tokens"] == 256
    assert "temperature" not in body and "top_p" not in body   # the server's own defaults unless asked
    assert len({r["body"]["seed"] for r in reqs[1:]}) == len(problems)   # one seed per request, when asked
    kept = {json.loads(x)["id"] for x in out.read_text().splitlines()}
    dropped = {json.loads(x)["id"] for x in rationales.dropped_path(out).read_text().splitlines()}
    assert kept | dropped == {p.id for p in problems} and kept and dropped and not kept & dropped
    printed = capsys.readouterr().out
    assert f"kept {len(kept)}, dropped {len(dropped)}" in printed


def test_rationales_endpoint_errors_that_a_retry_cannot_fix_stop_with_the_reason(tmp_path, capsys):
    from opcod import rationales

    class Refuse(BaseHTTPRequestHandler):
        bodies = []

        def do_POST(self):
            type(self).bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            data = b'{"error": {"message": "Unsupported parameter: temperature"}}'
            self.send_response(400)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rc = rationales.main(["--config", str(_synthetic_config(tmp_path / "d.yaml")), "--domain", "physics",
                              "--model", "m", "--out", str(tmp_path / "o.jsonl"), "--temperature", "0.3",
                              "--base-url", f"http://127.0.0.1:{server.server_port}/v1"])
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert rc == 2 and "HTTP 400" in err and "Unsupported parameter: temperature" in err
    assert "seed" not in Refuse.bodies[0] and Refuse.bodies[0]["temperature"] == 0.3   # no seed unless asked
    assert not (tmp_path / "o.jsonl").exists()   # nothing counted as done: a rerun asks again


# ----------------------------------------------------------------------------- the quick start

@pytest.mark.skipif(not SKE.is_dir(), reason=f"SciKnowEval copy not found at {SKE}")
def test_paper_quick_start_command_by_command_on_small_inputs(tiny_hub, tmp_path):
    """README's quick start for the paper's setting, each command with the paper's own config
    (configs/phys_chem.yaml, configs/sft/physics.yaml), made small by overrides only: the students
    by Hub id from the cache, SciKnowEval prepared from the shared copy, rationales, SFT, the
    memory plan, OPCoD, evaluation of its students, and the SDPO and GRPO baselines."""
    root, snaps, env = tiny_hub
    paper, data, models = ROOT / "configs" / "phys_chem.yaml", tmp_path / "data" / "sciknoweval", tmp_path / "models"
    small_data = [f"data.path={data}", "data.val_size=2", "data.test_size=2"]
    # 1. the base students into the Hub cache (here: already there, offline)
    res = _run("-m", "opcod.hub", "download", "opcod-test/random", env=env)
    assert res.returncode == 0, res.stderr
    # 2. SciKnowEval in SDPO's split
    res = _run("-m", "opcod.data", "prepare", SKE, data, "--domains", "physics", "chemistry", "--val-size", "2", env=env)
    assert res.returncode == 0, res.stderr
    # 3. SFT data: rationales for the physics training problems (the first 6)
    sft_data = tmp_path / "data" / "sft" / "physics.jsonl"
    res = _run("-m", "opcod.rationales", "--config", paper, "--domain", "physics", "--model", "opcod-test/answers-a",
               "--out", sft_data, "--engine", "hf", "--limit", "6", "--temperature", "0", "--max-new-tokens", "4",
               *small_data, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "kept" in res.stdout and sft_data.is_file()
    # 4. the physics student by SFT of the base model (from the Hub cache)
    res = torchrun("-m", "opcod.sft", "--config", ROOT / "configs" / "sft" / "physics.yaml", "model=opcod-test/random",
                   f"data={sft_data}", f"output={models / 'qwen3-8b-physics'}", "epochs=1", "batch_size=2",
                   "max_tokens=1024", nproc=1, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    # the other student stays a Hub id: both ways of naming a student in one run
    students = [f"students.0.path={models / 'qwen3-8b-physics'}", "students.1.path=opcod-test/answers-a"]
    # 5. the memory plan
    res = _run("-m", "opcod.plan", "--config", paper, *students, "--gpu-gib", "141", env=env)
    assert res.returncode == 0 and "peak per GPU" in res.stdout, res.stderr
    # 6. OPCoD, shrunk: one round of one step per student, short generations, the CPU engine
    small = [*students, *small_data, "rounds=1", "steps_per_phase=1", "prompts_per_step=2", "rollouts_per_prompt=2",
             "eval_k=1", "val_k=1", "save_every=0", "rollout.max_new_tokens=4", "evaluation.max_new_tokens=4",
             "feedback.max_new_tokens=4", "loss.max_solution_tokens=16", "loss.max_feedback_tokens=16",
             "engine.kind=hf", "engine.max_model_len=0", "engine.bucket_mb=16", "model.micro_batch_size=2"]
    runs = tmp_path / "runs"
    res = torchrun("-m", "opcod.train", "--config", paper, *small, f"output_dir={runs}", nproc=1, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    summary = json.loads((runs / "phys_chem" / "summary.json").read_text())
    assert set(summary["students"]) == {"phys_student", "chem_student"}
    saved = yaml.safe_load((runs / "phys_chem" / "config.yaml").read_text())
    assert saved["students"][1]["path"] == str(snaps["answers-a"]) and saved["data"]["path"] == str(data)
    # 7. evaluation of the trained students on the paper config's test questions
    exported = sorted(str(p) for p in (runs / "phys_chem" / "students").iterdir())
    res = _run("-m", "opcod.evaluate", *exported, "--config", paper, *small_data, "--k", "1", "--engine", "hf",
               "--max-new-tokens", "4", "--out", tmp_path / "eval.json", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    scores = json.loads((tmp_path / "eval.json").read_text())["rewards"]
    assert {m: {d: len(r) for d, r in v.items()} for m, v in scores.items()} == \
        {m: {"chemistry": 2, "physics": 2} for m in exported}
    # 8. the baselines from the same students
    res = _run("-m", "opcod.compare", "--config", paper, *small, "--methods", "sdpo", "grpo", "--nproc", "1",
               "--out", tmp_path / "compare", env=env, timeout=1200)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "sdpo: mutual Pareto improvement" in res.stdout and "grpo: mutual Pareto improvement" in res.stdout
