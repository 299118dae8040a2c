"""torchrun -m opcod.train: On-Policy Co-Distillation (the paper's Algorithm 1) on FSDP2, with
colocated generation engines kept in sync through bucketed weight transfers."""
from __future__ import annotations

import json
import os
import random
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint, cli, effects, report
from .config import Config, ConfigError, load_config, save_config
from .data import DataError, Problem
from .distributed import (all_sum, device_of_rank, init_distributed, log, on_orphan, quiet_transformers,
                          seed_for, watch_launcher)
from .domains import load_domains
from .engine_hf import Sampling
from .engines import Engines, make_engine
from .feedback import OutcomeCounts
from .gating import cognizance_gaps, cognizant, feedback_allowed, stronger_domains, tutor_for
from .grading import avg_at_k, reward
from .adapters import is_peft, merged, scale_of
from .metrics import effect_metrics, score_record
from .models import (AdapterFree, Student, apply_update, check_model_dir, compute_dtype, ema_update,
                     frozen_student, init_optimizer_state, load_student, load_tokenizer, make_optimizer,
                     move_optimizer_state, relocate, storage_device)
from .plan import Shape
from .rundir import RunLock, check_config
from .step import (distill_backward, grpo_backward, group_advantages, loss_denominator, make_rollouts,
                   old_logprobs, prompt_ids, reanswer, request_feedback, sdpo_counts, sdpo_fractions,
                   self_anchors, teacher_contexts)
from .trackers import Trackers, check_installed
from .weight_sync import SyncStats, bucket_bytes_for, hf_name, iter_full_params

DEFAULT_CONFIG = Path(__file__).with_name("configs") / "default.yaml"


# ----------------------------------------------------------------------------- the run's state

@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint."""
    round: int = 1
    phase: int = 0                      # index of the tutee within the round
    step: int = 0                       # steps done in this phase
    global_step: int = 0
    cursor: int = 0                     # prompts consumed from the union stream
    nonfinite: int = 0
    initial_test: dict | None = None
    initial_rewards: dict | None = None  # {student: {domain: {problem id: k rewards}}}, for intervals
    validation: dict | None = None      # this round's validation scores
    rounds: list = field(default_factory=list)
    outcomes: dict = field(default_factory=lambda: OutcomeCounts().as_dict())
    versions: dict = field(default_factory=dict)
    metrics_bytes: int = 0
    finished: bool = False


class CoDistillation:
    """Students, teachers, engines and data of one run, and the steps of Algorithm 1."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = device_of_rank()
        # Optimizer state of a student that is not training, and the tutor snapshots, wait on the
        # host on GPU runs (pinned); on CPU runs everything is host memory anyway.
        self.host = torch.device("cpu")
        self.run_dir = cfg.run_dir
        self.names = [s.name for s in cfg.students]
        # -- everything that can be wrong with the inputs fails here, before any compute
        for i, s in enumerate(cfg.students):
            check_model_dir(s.path, f"students.{i}.path")
        self.tokenizer = load_tokenizer(cfg.students[0].path, "students.0.path", cfg.model.trust_remote_code)
        for i, s in enumerate(cfg.students[1:], 1):
            if len(load_tokenizer(s.path, f"students.{i}.path", cfg.model.trust_remote_code)) != len(self.tokenizer):
                raise ConfigError(f"students.{i}.path: its tokenizer differs from students.0's")
        check_installed(cfg.logging.report_to)
        self.trackers = None  # rank 0's, made when the run directory exists
        if cfg.prompts_per_step % self.world:
            raise ConfigError(f"config key 'prompts_per_step' ({cfg.prompts_per_step}) must be divisible "
                              f"by the number of processes ({self.world})")
        self.train_set, self.val, self.test = load_domains(cfg)
        if cfg.engine.kind == "vllm":
            limit = Shape.from_config(Path(cfg.students[0].path) / "config.json").max_positions
            if cfg.engine.max_model_len > limit > 0:
                raise ConfigError(f"config key 'engine.max_model_len' ({cfg.engine.max_model_len}) exceeds "
                                  f"max_position_embeddings ({limit}) of {cfg.students[0].path}")
        if self.device.type == "cuda":
            from .plan import check_fits
            check_fits(cfg, self.world)
        self.dtype = compute_dtype(cfg.model.dtype, self.device)
        self.engine_dtype = self.dtype if cfg.engine.dtype == "auto" else compute_dtype(cfg.engine.dtype, self.device)
        self.progress = Progress(versions={n: 0 for n in self.names})
        self._prompt_cache: dict[str, list[int]] = {}
        self._order: tuple[int, list[int]] = (-1, [])

        # -- students under FSDP2, their optimizers, and teacher copies when not `current`
        self.students, self.optims, self.teachers, self.snapshots = {}, {}, {}, {}
        for s in cfg.students:
            torch.manual_seed(cfg.seed)
            student = load_student(s.path, self.device, cfg.model.lora, cfg.model.activation_checkpointing,
                                   cfg.model.trust_remote_code)
            self.students[s.name] = student
            self.optims[s.name] = make_optimizer(student, cfg.optim.lr, cfg.optim.weight_decay,
                                                 cfg.optim.betas, cfg.optim.warmup_steps)
            # AdamW's own zero state, made where it waits, so no checkpoint has to invent it.
            init_optimizer_state(self.optims[s.name][0], self.host)
            if cfg.loss.teacher_weights != "current" or (cfg.method == "grpo" and cfg.loss.grpo_kl > 0):
                # EMA / initial teacher, or GRPO's KL reference: the starting weights, frozen. With LoRA
                # the starting weights are the student with its adapters off: no copy.
                if cfg.model.lora.rank and cfg.loss.teacher_weights != "ema":
                    self.teachers[s.name] = AdapterFree(student)
                else:
                    self.teachers[s.name] = frozen_student(s.path, self.device, cfg.model.trust_remote_code,
                                                           like=student, lora=cfg.model.lora)

        # -- colocated engines: one for rollouts, one for the tutor (or one shared)
        separate = cfg.method == "opcod" and cfg.engine.tutor == "separate"
        bucket = bucket_bytes_for(self.students[self.names[0]], cfg.engine.bucket_mb, self.engine_dtype)

        def engine(i):
            # All students share the architecture: an engine starts from the first one's files and
            # gets every other student's weights through the bucket.
            return make_engine(cfg.engine, cfg.students[0].path, bucket_bytes=bucket, dtype=self.engine_dtype,
                               seed=seed_for(cfg.seed, self.rank, i), tokenizer=self.tokenizer, device=self.device,
                               trust_remote_code=cfg.model.trust_remote_code,
                               engines_per_rank=2 if separate else 1)
        # Every engine starts from students[0]'s files: its version 0 needs no push. vLLM engines
        # start awake; they sleep until first used, so no push ever meets an idle engine awake.
        self.engines = Engines(engine(0), engine(1) if separate else None, loaded=(self.names[0], 0))
        self.engines.sleep_for_update(keep=(self.names[0], 0))

    def close(self) -> None:
        self.engines.close()
        if self.trackers is not None:
            self.trackers.close()

    # ------------------------------------------------------------------------- engines

    def ensure(self, role: str, name: str, snapshot: bool = False) -> SyncStats | None:
        """Make the `role` engine hold student `name` (its latest weights, or its round snapshot)."""
        if snapshot:
            key = ("snapshot", name, self.progress.round)

            def weights():
                for k, v in self.snapshots[name].items():
                    if hasattr(v, "full_tensor"):  # back on the device one tensor at a time to gather
                        v = (relocate(v, self.device) if storage_device(v) != self.device else v).full_tensor()
                    yield hf_name(k, "lm."), v
        else:
            key = (name, self.progress.versions[name])

            def weights():
                yield from iter_full_params(self.students[name], strip="lm.")
        lm = self.students[name].lm
        # A LoRA student reaches the engine merged (W + scale B A under the base names).
        return self.engines.ensure(role, key, (lambda: merged(weights(), scale_of(lm))) if is_peft(lm) else weights)

    def begin_phase(self, tutee: str) -> None:
        """Before a phase's first step: the engines give the device back (the rollout engine keeps
        its weights only if they are the tutee's), then the other students' optimizer state leaves
        the device before the tutee's arrives, so no two AdamW states ever share it."""
        self.engines.sleep_for_update(keep=(tutee, self.progress.versions[tutee]))
        for other in self.names:
            if other != tutee:
                move_optimizer_state(self.optims[other][0], self.host)
        move_optimizer_state(self.optims[tutee][0], self.device)

    def sampling(self, which) -> Sampling:
        return Sampling(which.temperature, which.top_p, which.max_new_tokens)

    def prompt_ids(self, problem: Problem) -> list[int]:
        if problem.id not in self._prompt_cache:
            self._prompt_cache[problem.id] = prompt_ids(self.tokenizer, problem)
        return self._prompt_cache[problem.id]

    # ------------------------------------------------------------------------- evaluation

    def evaluate(self, name: str, problems: dict[str, list[Problem]], k: int, tag: int):
        """(avg@k per domain, {domain: {problem id: k rewards}}) of student `name` (evaluation
        sampling), the problems sharded over ranks and their rewards gathered on every rank."""
        self.ensure("rollout", name)
        scores, rewards = {}, {}
        for d_index, (domain, probs) in enumerate(sorted(problems.items())):
            mine = probs[self.rank::self.world]
            prompts = [self.prompt_ids(p) for p in mine for _ in range(k)]
            outs = self.engines.generate("rollout", prompts, self.sampling(self.cfg.evaluation),
                                         seed_for(self.cfg.seed, tag, self.names.index(name), d_index, self.rank))
            local = {p.id: [reward(self.tokenizer.decode(o, skip_special_tokens=True), p.answer,
                                   strict=self.cfg.grading.require_closing_tag)
                            for o in outs[i * k:(i + 1) * k]] for i, p in enumerate(mine)}
            shards = [None] * self.world
            dist.all_gather_object(shards, local)
            rewards[domain] = {pid: r for shard in shards for pid, r in shard.items()}
            scores[domain] = avg_at_k([rewards[domain][p.id] for p in probs]) if probs else 0.0
        return scores, rewards

    def evaluate_all(self, split: str, tag: int):
        """({student: {domain: avg@k}}, {student: {domain: {problem id: rewards}}}) on a split."""
        problems, k = (self.val, self.cfg.val_k) if split == "validation" else (self.test, self.cfg.eval_k)
        names = self.names
        if self.rank == 0:
            from tqdm import tqdm
            names = tqdm(self.names, desc=f"{split} avg@{k}", unit="student", leave=False)
        results = {n: self.evaluate(n, problems, k, tag) for n in names}
        scores = {n: r[0] for n, r in results.items()}
        self.log_metrics(score_record(split, self.progress.global_step, self.progress.round, scores, k))
        return scores, {n: r[1] for n, r in results.items()}

    # ------------------------------------------------------------------------- one step

    def next_prompts(self) -> list[Problem]:
        """This rank's share of the next prompts_per_step problems of the union stream."""
        n, out = len(self.train_set), []
        for i in range(self.progress.cursor, self.progress.cursor + self.cfg.prompts_per_step):
            epoch, pos = divmod(i, n)
            if self._order[0] != epoch:  # a seeded shuffle per epoch, computed once
                self._order = (epoch, random.Random(seed_for(self.cfg.seed, 7, epoch)).sample(range(n), n))
            out.append(self.train_set[self._order[1][pos]])
        self.progress.cursor += self.cfg.prompts_per_step
        return out[self.rank::self.world]

    def stronger(self) -> dict[str, dict]:
        """Each student's stronger domain(s) this round: its configured domain, else the validation
        argmax (gating.stronger_domains)."""
        return stronger_domains(self.progress.validation, {s.name: s.domain for s in self.cfg.students})

    def step(self, tutee: str, tutor: str) -> dict:
        cfg, p = self.cfg, self.progress
        t0 = time.perf_counter()
        student = self.students[tutee]
        opt, sched = self.optims[tutee]
        n = cfg.rollouts_per_prompt
        seed = seed_for(cfg.seed, p.round, p.phase, p.step, self.rank)

        # 1. n on-policy rollouts per prompt from the tutee, graded
        problems = self.next_prompts()
        ids = [self.prompt_ids(q) for q in problems]
        self.ensure("rollout", tutee)
        responses = self.engines.generate("rollout", [i for i in ids for _ in range(n)],
                                          self.sampling(cfg.rollout), seed)
        rollouts = make_rollouts(problems, ids, responses, n, self.tokenizer,
                                 strict=cfg.grading.require_closing_tag)
        # Copies of a prompt must sample differently (per-request seeds); 1.0 when all n differ.
        distinct = sum(len({tuple(r.response_ids) for r in rollouts[g * n:(g + 1) * n]})
                       for g in range(len(problems)))
        if cfg.method != "grpo":
            for g in range(len(problems)):
                self_anchors(rollouts[g * n:(g + 1) * n], cfg.loss.allow_self_anchor)
        t_gen = time.perf_counter()

        # 2. gated tutor feedback, anchored and sanitized
        outcomes = OutcomeCounts()
        gate_open = False
        if cfg.method == "opcod":
            own = set(self.stronger()[tutor]["domains"])

            def allowed(r):
                return feedback_allowed(cfg.gate, tutor, r.problem.domain, p.validation, cfg.tau, own)
            gate_open = any(feedback_allowed(cfg.gate, tutor, d, p.validation, cfg.tau, own) for d in cfg.data.domains)
            if gate_open:
                self.ensure("tutor", tutor, snapshot=cfg.tutor_snapshot == "round_start")
                tutor_seed = seed_for(seed, 1)
                outcomes = request_feedback(rollouts, allowed, lambda prompts: self.engines.generate(
                    "tutor", prompts, self.sampling(cfg.feedback), tutor_seed), self.tokenizer)
            if self.engines.shared:
                self.ensure("rollout", tutee)  # a shared engine switches back before the next use
        t_fb = time.perf_counter()

        # (diagnostic) the feedback's effect: the tutee re-answers in each arm, before its update
        effect_counts = None
        if cfg.logging.feedback_effects and cfg.method == "opcod":
            reanswer_seed = seed_for(seed, 2)
            post = reanswer(rollouts, lambda prompts: self.engines.generate(
                "rollout", prompts, self.sampling(cfg.rollout), reanswer_seed), self.tokenizer,
                cfg.loss.max_solution_tokens, cfg.loss.max_feedback_tokens, strict=cfg.grading.require_closing_tag)
            local = effects.step_counts(effects.records_of(rollouts, post, n))
            effect_counts = dict(zip(local, map(int, all_sum(list(local.values()), self.device))))
        t_eff = time.perf_counter()

        # 3. the update: self-distillation towards the teacher contexts (GRPO: group-relative PG)
        self.engines.sleep_for_update()
        if cfg.method == "grpo":
            loss, updates = self.grpo_update(student, tutee, rollouts, opt)
        else:
            loss, updates = self.distill_update(student, tutee, rollouts, opt)
        sched.step()  # once per step, skipped or not, as in SDPO
        stepped = any(ok for ok, _ in updates)
        grad_norm = updates[-1][1] if updates else float("nan")
        if stepped:
            if cfg.loss.teacher_weights == "ema" and cfg.method != "grpo":
                ema_update(self.teachers[tutee], student, cfg.loss.ema_rate)
            p.versions[tutee] += 1
            p.nonfinite = 0
        else:
            p.nonfinite += 1
        t_bwd = time.perf_counter()

        # 4. push the new weights to the rollout engine
        stats = self.ensure("rollout", tutee) if stepped else None
        t_sync = time.perf_counter()

        lengths = [len(r.response_ids) for r in rollouts]
        local_sd = sdpo_counts(rollouts, n)
        (rewards, count, distinct, leaks, tokens, clipped, prompt_tokens, *sd) = all_sum(
            [sum(r.reward for r in rollouts), len(rollouts), distinct,
             sum(r.leak for r in rollouts), sum(lengths), sum(x >= cfg.rollout.max_new_tokens for x in lengths),
             sum(len(r.prompt_ids) for r in rollouts), *local_sd.values()], self.device)
        longest = torch.tensor(float(max(lengths, default=0)), device=self.device)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        outcomes = outcomes.all_reduce()
        counts = outcomes.as_dict()
        for k, v in counts.items():
            p.outcomes[k] += v
        asked = sum(counts.values())
        cuda = self.device.type == "cuda"
        # verl's and SDPO's names where they have one; OPCoD's own under opcod/ (opcod/metrics.py).
        return {"kind": "step", "step": p.global_step + 1,
                "opcod/round": p.round, "opcod/phase": p.phase, "opcod/step_in_phase": p.step + 1,
                "opcod/tutee": tutee, "opcod/tutor": tutor,
                "actor/pg_loss": float(loss), "actor/grad_norm": grad_norm, "actor/lr": sched.get_last_lr()[0],
                "critic/rewards/mean": rewards / count,
                "response_length/mean": tokens / count, "response_length/max": float(longest),
                "response_length/clip_ratio": clipped / count,
                **sdpo_fractions(dict(zip(local_sd, map(int, sd)))),
                "timing_s/gen": t_gen - t0, "timing_s/feedback": t_fb - t_gen, "timing_s/effects": t_eff - t_fb,
                "timing_s/update_actor": t_bwd - t_eff,
                "timing_s/update_weights": t_sync - t_bwd, "timing_s/step": t_sync - t0,
                # tokens/s per rank, the diagnostic's re-answers left out
                "perf/throughput": (tokens + prompt_tokens) / (t_sync - t0 - (t_eff - t_fb)) / self.world,
                # The trainer's own peaks since the run started (engines are other processes).
                "perf/max_memory_allocated_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                "perf/max_memory_reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
                "opcod/skipped": not stepped, "opcod/optimizer_updates": sum(ok for ok, _ in updates),
                "opcod/gate_open": gate_open,
                **{f"opcod/feedback/{k}": v for k, v in counts.items()},
                "opcod/feedback/kept_fraction": counts["kept"] / asked if asked else None,
                # Kept feedback that still names the gold letter (an ordinary mention, or a leak).
                "opcod/feedback_leak_rate": leaks / counts["kept"] if counts["kept"] else None,
                "opcod/distinct_rollout_fraction": distinct / count,
                "opcod/sync_gb_s": stats.gb_per_s if stats else None, "opcod/sync_bytes": stats.bytes if stats else 0,
                **effect_metrics(effect_counts)}

    def distill_update(self, student, tutee: str, rollouts, opt) -> tuple[float, list]:
        """One optimizer step on the self-distillation loss; a non-finite loss or gradient norm
        skips it. Returns (loss, [(stepped, grad norm)])."""
        cfg = self.cfg
        teacher_contexts(rollouts, self.tokenizer, cfg.loss.max_solution_tokens, cfg.loss.max_feedback_tokens)
        teacher = self.teachers.get(tutee, student)
        # An EMA or initial teacher scores with its own lm_head, gathered once per step.
        head = None if teacher is student or isinstance(teacher, AdapterFree) else teacher.output_weight(self.dtype)
        loss = distill_backward(student, teacher, rollouts, cfg.model.micro_batch_size, self.tokenizer.pad_token_id,
                                self.device, cfg.loss.beta, loss_denominator(rollouts, cfg.loss.normalize, self.device),
                                cfg.loss.normalize, head, cfg.loss.topk, cfg.loss.topk_tail)
        dist.all_reduce(loss)
        if not torch.isfinite(loss):
            opt.zero_grad(set_to_none=True)
            return float(loss), [(False, float("nan"))]
        return float(loss), [apply_update(student, opt, cfg.optim.grad_clip)]

    def grpo_update(self, student, tutee: str, rollouts, opt) -> tuple[float, list]:
        """GRPO as SDPO's baseline runs it: advantages centred per prompt (divided by the std only if
        asked), the batch split by prompts into loss.grpo_mini_batches optimizer updates against the
        log-probs it was sampled with, verl's clipped PPO loss. Returns (mean loss, updates)."""
        cfg, n = self.cfg, self.cfg.rollouts_per_prompt
        advantages = group_advantages([r.reward for r in rollouts], n, cfg.loss.grpo_std_normalize)
        groups = len(rollouts) // n
        parts = [(g[0] * n, (g[-1] + 1) * n) for g in np.array_split(range(groups), cfg.loss.grpo_mini_batches)
                 if len(g)]
        old = None if len(parts) == 1 else old_logprobs(student, rollouts, cfg.model.micro_batch_size,
                                                         self.tokenizer.pad_token_id, self.device)
        losses, updates = [], []
        for a, b in parts:
            part = rollouts[a:b]
            loss = grpo_backward(student, self.teachers.get(tutee), part, advantages[a:b], cfg.model.micro_batch_size,
                                 self.tokenizer.pad_token_id, self.device, cfg.loss.grpo_kl,
                                 loss_denominator(part, cfg.loss.normalize, self.device), cfg.loss.normalize,
                                 cfg.loss.grpo_clip_low, cfg.loss.grpo_clip_high, cfg.loss.grpo_clip_dual,
                                 None if old is None else old[a:b])
            dist.all_reduce(loss)
            losses.append(float(loss))
            if torch.isfinite(loss):
                updates.append(apply_update(student, opt, cfg.optim.grad_clip))
            else:
                opt.zero_grad(set_to_none=True)
                updates.append((False, float("nan")))
        return sum(losses) / len(losses), updates

    # ------------------------------------------------------------------------- persistence

    def log_metrics(self, record: dict) -> None:
        if self.rank != 0:
            return
        if "jsonl" in self.cfg.logging.report_to:
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            self.progress.metrics_bytes = (self.run_dir / "metrics.jsonl").stat().st_size
        if self.trackers is not None:
            self.trackers.log(record, self.progress.global_step)

    def _persisted(self):
        modules = {f"student.{n}": m for n, m in self.students.items()}
        modules.update({f"teacher.{n}": m for n, m in self.teachers.items() if isinstance(m, Student)})
        optims = {n: (self.students[n], self.optims[n][0]) for n in self.names}
        tensors = {n: dict(snap) for n, snap in self.snapshots.items()}
        return modules, optims, tensors

    def save(self, tag: str) -> None:
        modules, optims, tensors = self._persisted()
        state = {"progress": self.progress.__dict__,
                 "schedulers": {n: self.optims[n][1].state_dict() for n in self.names},
                 "snapshot_names": sorted(self.snapshots)}
        checkpoint.save(self.run_dir / "checkpoints", tag, modules, optims, tensors, state)

    def resume(self) -> bool:
        path = checkpoint.latest(self.run_dir / "checkpoints")
        if path is None:
            return False
        state = json.loads((path / "train_state.json").read_text())
        for n in state["snapshot_names"]:  # placeholders with the right placements to load into
            self.snapshots[n] = self.take_snapshot(n)
        modules, optims, tensors = self._persisted()
        checkpoint.load(path, modules, optims, tensors)
        for n in self.names:
            self.optims[n][1].load_state_dict(state["schedulers"][n])
        self.progress = Progress(**state["progress"])
        # A checkpoint from before an outcome existed counts it 0 (older "empty" counts stay as written).
        self.progress.outcomes = OutcomeCounts.of(self.progress.outcomes).as_dict()
        if self.rank == 0 and (self.run_dir / "metrics.jsonl").exists():
            with open(self.run_dir / "metrics.jsonl", "r+b") as f:  # drop lines after the checkpoint
                f.truncate(self.progress.metrics_bytes)
        log(f"resumed from {path} (round {self.progress.round}, phase {self.progress.phase}, "
            f"step {self.progress.step})")
        return True

    def take_snapshot(self, name: str) -> dict:
        """The tutor's round-start weights, in the engine's dtype: only an engine ever reads them."""
        return {k: relocate(v.detach().to(self.engine_dtype), self.host)
                for k, v in self.students[name].named_parameters()}

    def export(self, name: str) -> None:
        checkpoint.export_hf(self.students[name], self.tokenizer, self.run_dir / "students" / name)


# ----------------------------------------------------------------------------- Algorithm 1

def train(cfg: Config) -> dict | None:
    """Algorithm 1 in cfg.run_dir: a fresh run, a resume under the config it started with, or the
    summary of a finished one. One writer at a time: rank 0 holds the directory's lock. A start
    refused before anything is written leaves no run directory behind."""
    created = [d for d in (cfg.run_dir, *cfg.run_dir.parents) if not d.exists()]
    lock = _take_lock(cfg)
    try:
        accepted = check_config(cfg, cfg.run_dir / "config.yaml")  # before any compute
        last = checkpoint.latest(cfg.run_dir / "checkpoints")
        if last is not None and json.loads((last / "train_state.json").read_text())["progress"]["finished"]:
            log(f"{cfg.run_dir} is finished already; summary: {cfg.run_dir / 'summary.json'}")
            return json.loads((cfg.run_dir / "summary.json").read_text())
        run = CoDistillation(cfg)
        try:
            return _train(run, accepted)
        finally:
            run.close()
    finally:
        if lock is not None:
            lock.release()
            for d in created:  # only the folders this call made, and only while they are empty
                try:
                    d.rmdir()
                except OSError:
                    break


def _take_lock(cfg: Config) -> RunLock | None:
    lock, error = None, None
    if dist.get_rank() == 0:
        try:
            lock = RunLock(cfg.run_dir)
            lock.acquire(log=log)
            on_orphan(lock.release)
        except ConfigError as exc:
            error = str(exc)
    verdict = [error]
    dist.broadcast_object_list(verdict, src=0)  # every rank stops, or none does
    if verdict[0]:
        raise ConfigError(verdict[0])
    return lock


def _train(run: CoDistillation, accepted: list) -> dict | None:
    cfg, p = run.cfg, run.progress
    if run.rank == 0:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        if set(cfg.logging.report_to) - {"jsonl"}:
            run.trackers = Trackers(cfg.logging.report_to, run.run_dir, cfg.run_name, cfg.logging.project,
                                    asdict(cfg))
    dist.barrier()
    if run.resume():
        p = run.progress
        if accepted:  # resume=force took changes of keys that are safe to change mid-run
            log("resume=force: " + "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in accepted))
            run.log_metrics({"kind": "config_change", "step": p.global_step,
                             "opcod/config_changes": [{"key": k, "was": a, "now": b} for k, a, b in accepted]})
            if run.rank == 0:
                save_config(cfg, run.run_dir / "config.yaml")
    else:
        if run.rank == 0:
            save_config(cfg, run.run_dir / "config.yaml")
            (run.run_dir / "metrics.jsonl").write_text("")
        p.initial_test, p.initial_rewards = run.evaluate_all("test", tag=0)
    S, K = len(run.names), cfg.steps_per_phase
    bar = None
    if run.rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=cfg.rounds * S * K, initial=p.global_step, desc="opcod", unit="step")

    while p.round <= cfg.rounds:
        if p.phase == 0 and p.step == 0:
            # Round start: validation scores, cognizance gaps, tutor snapshots.
            p.validation = run.evaluate_all("validation", tag=p.round)[0]
            gaps, aware = cognizance_gaps(p.validation), cognizant(p.validation, cfg.tau)
            # Where each tutor would still write feedback under gate=domain_selective, and whether
            # that comes from its config or from this round's validation argmax.
            stronger = run.stronger()
            p.rounds.append({"round": p.round, "validation": p.validation, "gaps": gaps, "cognizant": aware,
                             "stronger_domains": stronger})
            log(f"round {p.round}: " + ", ".join(f"{n} gap {gaps[n]:.3f} ({'cognizant' if aware[n] else 'incognizant'})"
                                                 for n in run.names))
            if cfg.gate == "domain_selective":
                log("domain_selective: an incognizant tutor writes feedback only on " + "; ".join(
                    f"{n}: {', '.join(v['domains'])} (from {v['from']})" for n, v in stronger.items()))
            if cfg.method == "opcod" and cfg.tutor_snapshot == "round_start":
                run.snapshots = {n: run.take_snapshot(n) for n in run.names}
        while p.phase < S:
            tutee = run.names[p.phase]
            tutor = tutor_for(run.names, tutee, p.round)
            run.begin_phase(tutee)
            while p.step < K:
                record = run.step(tutee, tutor)
                p.step += 1
                p.global_step += 1
                run.log_metrics(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['actor/pg_loss']:.4f}",
                                    reward=f"{record['critic/rewards/mean']:.2f}")
                if record["opcod/skipped"]:
                    log(f"step {p.global_step}: non-finite loss or gradient norm, step skipped")
                    if p.nonfinite >= cfg.loss.max_nonfinite_steps:
                        raise RuntimeError(f"{p.nonfinite} consecutive non-finite losses (last at step "
                                           f"{p.global_step}); stopping. The last checkpoint is kept in "
                                           f"{run.run_dir / 'checkpoints'}")
                if cfg.save_every and p.step % cfg.save_every == 0 and p.step < K:
                    run.save(f"step-{p.global_step:06d}")
            run.export(tutee)
            p.phase, p.step = p.phase + 1, 0
            run.save(f"step-{p.global_step:06d}")
        p.round, p.phase = p.round + 1, 0
    if bar is not None:
        bar.close()

    final_validation = run.evaluate_all("validation", tag=cfg.rounds + 1)[0]
    final_test, final_rewards = run.evaluate_all("test", tag=10_000)
    data = report.summary(p.initial_test, final_test, p.rounds, p.outcomes,
                          intervals=report.intervals(p.initial_rewards, final_rewards, cfg.seed))
    p.finished = True
    if run.rank == 0:
        report.write_summary(run.run_dir, data)
        report.plot_validation(run.run_dir, p.rounds, final_validation)
    run.save(f"step-{p.global_step:06d}-final")
    log(report.table(data))
    return data


# ----------------------------------------------------------------------------- entry point

def build_parser():
    ap = cli.parser("torchrun -m opcod.train", __doc__)
    cli.add_config_args(ap, "a YAML config (default: the embedded CPU demo, opcod/configs/default.yaml)")
    return ap


def parse_args(argv):
    return cli.parse(build_parser(), argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config or str(DEFAULT_CONFIG), args.overrides)
    except ConfigError as exc:
        print(f"opcod.train: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        cli.print_config(cfg)
        return 0
    if int(os.environ.get("RANK", 0)) == 0:
        cli.warn_cpu_engine(cfg.engine.kind, "opcod.train")
    if cfg.demo:
        from .demo import pin_cpu_numerics
        pin_cpu_numerics()  # before the first tensor operation of the process
    quiet_transformers()
    init_distributed()
    watch_launcher()
    try:
        if cfg.demo:
            from .demo import prepare
            cfg = prepare(cfg)
        else:
            from .hub import resolve_students
            cfg = resolve_students(cfg)  # students named by Hub id: rank 0 downloads, the others read its cache
        train(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        if not isinstance(exc, (ConfigError, DataError, FileNotFoundError)):
            traceback.print_exc()  # not an input named by us: where it came from matters
        print(f"opcod.train: {exc}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
