"""python -m opcod.rationales: App. D.1's SFT data, a model's rationale reaching each training problem's gold answer, kept when opcod's grader scores it right."""
from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import cli, prompts
from .config import ConfigError, load_config
from .data import DataError, Problem, read_jsonl
from .grading import extract_answer, reward

# What a local engine samples with when no option says otherwise (an endpoint gets only what is
# asked for: some models, gpt-5-mini among them, accept only their own default temperature).
LOCAL_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 4096}


def rationale_messages(p: Problem) -> list[dict[str, str]]:
    """What the rationale model reads: the student's prompt, the gold option and the format."""
    text = dict(p.options)[p.answer]
    return prompts.rationale_messages(p.prompt, p.answer, text)


def sft_record(p: Problem, response: str) -> dict:
    """The line opcod.sft reads: the student's own prompt (no answer in it) and the rationale."""
    return {"id": p.id, "domain": p.domain, "answer": p.answer, "messages": prompts.messages(p.prompt),
            "response": response}


# ----------------------------------------------------------------------------- generators

class EngineGenerator:
    """A local Hugging Face model through opcod's engines (hf on CPU, vllm on GPU)."""

    def __init__(self, model_dir: str, kind: str, engine_cfg, sampling: dict, seed: int):
        import dataclasses

        from .distributed import device_of_rank
        from .engine_hf import Sampling
        from .engines import make_engine
        from .models import check_model_dir, compute_dtype, load_tokenizer
        check_model_dir(model_dir, "--model")
        self.tokenizer = load_tokenizer(model_dir, "--model")
        device = device_of_rank()
        engine_cfg = dataclasses.replace(engine_cfg, kind=kind)
        dtype = compute_dtype("auto" if engine_cfg.dtype == "auto" else engine_cfg.dtype, device)
        self.engine = make_engine(engine_cfg, model_dir, bucket_bytes=1 << 20, dtype=dtype, seed=seed,
                                  tokenizer=self.tokenizer, device=device)
        self.sampling = Sampling(sampling["temperature"], sampling["top_p"], sampling["max_new_tokens"])
        self.seed = seed
        self.calls = 0

    def __call__(self, problems: Sequence[Problem]) -> list[str | Exception]:
        ids = [self.tokenizer.encode(prompts.render(self.tokenizer, rationale_messages(p)), add_special_tokens=False)
               for p in problems]
        # Each call its own seed block: a retry of a problem samples anew.
        outs = self.engine.generate(ids, self.sampling, self.seed + 1_000_003 * self.calls)
        self.calls += 1
        return [self.tokenizer.decode(o, skip_special_tokens=True) for o in outs]

    def close(self) -> None:
        self.engine.close()


class EndpointError(RuntimeError):
    """The endpoint refused a request in a way a retry will not fix (bad model name, key, parameter)."""


class EndpointGenerator:
    """An OpenAI-compatible chat-completions endpoint (OpenAI, vLLM's server, ...), over urllib."""

    RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)
    BACKOFF_S = 2.0           # the first wait before a retry; doubled each time (2, 4, 8, 16, 32 s)

    def __init__(self, base_url: str, model: str, api_key: str | None, sampling: dict, seed: int | None,
                 workers: int = 8, retries: int = 5, timeout: float = 600.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.seed = model, api_key, seed
        self.sampling = sampling
        self.workers, self.retries, self.timeout = workers, retries, timeout
        self.calls = 0

    def request(self, messages: list[dict], seed: int | None) -> str:
        body = {"model": self.model, "messages": messages}
        if seed is not None:
            body["seed"] = seed
        for key, name in (("temperature", "temperature"), ("top_p", "top_p"),
                          ("max_new_tokens", "max_completion_tokens")):
            if self.sampling.get(key) is not None:
                body[name] = self.sampling[key]
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    reply = json.loads(resp.read())
                content = reply["choices"][0]["message"]["content"]
                if not isinstance(content, str):
                    raise ValueError("the reply has no text content")
                return content
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")[:500]
                if exc.code not in self.RETRY_STATUS:
                    raise EndpointError(f"{self.url} answered HTTP {exc.code}: {detail}") from None
                error: Exception = RuntimeError(f"HTTP {exc.code}: {detail}")
            except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
                error = exc
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                error = RuntimeError(f"unreadable reply ({exc!r})")
            if attempt < self.retries:
                time.sleep(self.BACKOFF_S * 2 ** attempt)
        return error  # type: ignore[return-value]  # counted as failed, retried by the next run

    def __call__(self, problems: Sequence[Problem]) -> list[str | Exception]:
        base = None if self.seed is None else self.seed + 1_000_003 * self.calls
        self.calls += 1
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(lambda jp: self.request(rationale_messages(jp[1]),
                                                         None if base is None else base + jp[0]),
                                 enumerate(problems)))

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- the files

def dropped_path(out: Path) -> Path:
    """Where the problems whose rationales all scored wrong are listed (they count as done)."""
    return out.with_name(out.stem + ".dropped.jsonl")


def _repair(path: Path) -> None:
    """Cut a last line a killed run left half written: everything before it is whole."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
        print(f"opcod.rationales: {path}: dropped a half-written last line (its problem is asked again)",
              file=sys.stderr)


def finished(out: Path, domain: str) -> tuple[set[str], int, int]:
    """(ids already done, kept, dropped) from an earlier run's files; refuses another domain's."""
    done, counts = set(), []
    for path in (out, dropped_path(out)):
        _repair(path)
        n = 0
        if path.is_file():
            for lineno, rec in read_jsonl(path):
                if "id" not in rec:
                    raise DataError(f"{path}:{lineno}: no 'id': not a file opcod.rationales wrote")
                if rec.get("domain") != domain:
                    raise DataError(f"{path}:{lineno}: a {rec.get('domain')!r} problem, but --domain is {domain!r}: "
                                    "write each domain to a file of its own")
                done.add(str(rec["id"]))
                n += 1
        counts.append(n)
    return done, counts[0], counts[1]


def _append(path: Path, records: list[dict]) -> None:
    if not records:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- the loop

@dataclass
class Counts:
    kept: int = 0
    dropped: int = 0
    failed: int = 0        # no answer from the model (endpoint errors): asked again by the next run
    before: int = 0        # done by an earlier run
    kept_total: int = 0    # what the files hold now, this run's and earlier runs'
    dropped_total: int = 0


def build(problems: Sequence[Problem], generate: Callable[[Sequence[Problem]], list], out: Path, domain: str, *,
          attempts: int = 1, batch_size: int = 64, progress: bool = True) -> Counts:
    """Rationales for every problem not yet in `out` (or its .dropped file), a batch at a time,
    each batch appended (and synced) as soon as it is graded: a killed run loses one batch at most."""
    out.parent.mkdir(parents=True, exist_ok=True)
    done, kept_before, dropped_before = finished(out, domain)
    todo = [p for p in problems if p.id not in done]
    counts = Counts(before=sum(p.id in done for p in problems))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(problems), initial=counts.before, desc=f"rationales {domain}", unit="problem")
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        kept, last, failed = {}, {}, {}
        pending = batch
        for _ in range(attempts):
            replies = generate(pending)
            for p, reply in zip(pending, replies):
                if isinstance(reply, Exception):
                    failed[p.id] = reply
                    continue
                failed.pop(p.id, None)
                text = prompts.strip_think(reply).strip()
                if reward(text, p.answer) == 1.0:
                    kept[p.id] = text
                else:
                    last[p.id] = text
            pending = [p for p in pending if p.id not in kept]
            if not pending:
                break
        keep = [sft_record(p, kept[p.id]) for p in batch if p.id in kept]
        drop = [{"id": p.id, "domain": p.domain, "answer": p.answer, "extracted": extract_answer(last[p.id]),
                 "response": last[p.id]} for p in batch if p.id not in kept and p.id not in failed]
        _append(out, keep)
        _append(dropped_path(out), drop)
        counts.kept += len(keep)
        counts.dropped += len(drop)
        counts.failed += len(failed)
        if failed and counts.failed == len(failed):
            first = next(iter(failed.values()))
            print(f"opcod.rationales: no answer for {len(failed)} problem(s) ({first}); they are asked again "
                  "by the next run", file=sys.stderr)
        if bar is not None:
            bar.update(len(batch))
            bar.set_postfix(kept=kept_before + counts.kept, dropped=dropped_before + counts.dropped)
    if bar is not None:
        bar.close()
    counts.kept_total, counts.dropped_total = kept_before + counts.kept, dropped_before + counts.dropped
    return counts


def training_problems(cfg, domain: str, limit: int = 0) -> list[Problem]:
    """The domain's train split as the trainer sees it (validation carved out, test never read for
    training), so no SFT rationale is written for a question OPCoD validates or tests on."""
    from .domains import load_domains
    train, _, _ = load_domains(cfg)
    problems = [p for p in train if p.domain == domain]
    return problems[:limit] if limit else problems


def build_parser():
    ap = cli.parser("python -m opcod.rationales", __doc__)
    cli.add_config_args(ap, "a run config: its data section names the problems (the domain's train split, "
                            "validation carved out), e.g. configs/phys_chem.yaml", required=True)
    ap.add_argument("--domain", required=True, help="the domain whose training problems get rationales")
    ap.add_argument("--out", required=True, help="the JSONL opcod.sft reads (data=OUT); dropped problems go to "
                                                 "OUT's name + .dropped.jsonl; a rerun continues both")
    ap.add_argument("--model", required=True,
                    help="a local Hugging Face model folder or Hub id (with --engine), or the endpoint's model name "
                         "(with --base-url), e.g. gpt-5-mini as in App. D.1")
    ap.add_argument("--engine", choices=["hf", "vllm"], default=None,
                    help="a local model's engine (default: the config's engine.kind)")
    ap.add_argument("--base-url", help="an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1 or a "
                                       "vLLM server's http://host:8000/v1, instead of a local model")
    ap.add_argument("--api-key-env", default="OPENAI_API_KEY",
                    help="the environment variable holding the endpoint's key (none sent when it is unset)")
    ap.add_argument("--workers", type=int, default=8, help="concurrent endpoint requests")
    ap.add_argument("--temperature", type=float, help=f"default: {LOCAL_SAMPLING['temperature']} for a local model, "
                                                      "the server's own for an endpoint")
    ap.add_argument("--top-p", type=float, help=f"default: {LOCAL_SAMPLING['top_p']} for a local model, the "
                                                "server's own for an endpoint")
    ap.add_argument("--max-new-tokens", type=int, help=f"default: {LOCAL_SAMPLING['max_new_tokens']} for a local "
                                                       "model, the server's own for an endpoint")
    ap.add_argument("--attempts", type=int, default=1,
                    help="samples per problem until one scores right (App. D.1 does not say; 1 asks once)")
    ap.add_argument("--batch-size", type=int, default=64, help="problems per batch (each batch is saved as done)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N training problems (0: all)")
    ap.add_argument("--seed", type=int, help="sampling seed (default: 0 for a local model; none sent to an endpoint, "
                                             "whose models may not take one)")
    return ap


def main(argv=None) -> int:
    args = cli.parse(build_parser(), argv)
    prog = "opcod.rationales"
    try:
        cfg = load_config(args.config, [*args.overrides, f"data.domains=[{args.domain}]", "demo=true"])
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        cli.print_config(cfg)
        return 0
    for key in ("attempts", "batch_size", "workers"):
        if getattr(args, key) < 1:
            print(f"{prog}: --{key.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    asked = {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens}
    out = Path(args.out)
    generator = None
    try:
        problems = training_problems(cfg, args.domain, args.limit)
        if args.base_url:
            generator = EndpointGenerator(args.base_url, args.model, os.environ.get(args.api_key_env), asked,
                                          args.seed, workers=args.workers)
            where = f"{args.model} at {args.base_url}"
        else:
            from .hub import resolve
            kind = args.engine or cfg.engine.kind
            cli.warn_cpu_engine(kind, prog)
            sampling = {k: LOCAL_SAMPLING[k] if v is None else v for k, v in asked.items()}
            generator = EngineGenerator(resolve(args.model, "--model"), kind, cfg.engine, sampling, args.seed or 0)
            where = f"{args.model} ({kind} engine)"
        print(f"{prog}: {len(problems)} {args.domain} training problems, rationales from {where} -> {out}",
              file=sys.stderr)
        counts = build(problems, generator, out, args.domain, attempts=args.attempts, batch_size=args.batch_size)
    except (ConfigError, DataError, FileNotFoundError, ValueError, EndpointError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    finally:
        if generator is not None:
            generator.close()
    print(f"{args.domain}: kept {counts.kept}, dropped {counts.dropped} (wrong or no answer), failed {counts.failed} "
          f"(no reply; asked again by a rerun), done before {counts.before}; {out} holds {counts.kept_total} "
          f"rationales, {dropped_path(out)} {counts.dropped_total} dropped problems")
    return 1 if counts.failed else 0


if __name__ == "__main__":
    sys.exit(main())
