"""Models by Hugging Face Hub id (`students.0.path=Qwen/Qwen3-8B`): resolved to a snapshot in the Hub cache, downloaded on first use."""
from __future__ import annotations

import re
import sys
from pathlib import Path

# owner/name, optionally @revision (a branch, tag or commit), as the Hub spells repository ids.
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?")
# What opcod reads of a model: config and generation config, safetensors weights and their index,
# tokenizer files and chat template. Pickled *.bin / *.pth copies are never read, so never fetched.
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def hub_id(path: str) -> tuple[str, str | None] | None:
    """(repo id, revision) when `path` names a Hub model rather than a local folder, else None.
    A folder that exists always wins; so does anything that looks like a filesystem path."""
    if not path or Path(path).expanduser().exists() or path.startswith((".", "/", "~")):
        return None
    m = _HUB_ID.fullmatch(path)
    return (m["repo"], m["rev"]) if m else None


def resolve(path: str, key: str, files: list[str] | None = None) -> str:
    """A local folder for `path`: itself, or the Hub cache's snapshot of the model it names (only
    `files` of it, default MODEL_FILES), downloaded if missing unless HF_HUB_OFFLINE=1. Errors
    name the config key."""
    ident = hub_id(path)
    if ident is None:
        return path
    repo, revision = ident
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
    where = f"{key}: {path!r} is neither a local folder (looked for in {Path.cwd()}) nor"
    try:
        return snapshot_download(repo, revision=revision, allow_patterns=files or MODEL_FILES)
    except LocalEntryNotFoundError as exc:
        if constants.HF_HUB_OFFLINE:
            raise FileNotFoundError(f"{where} a model complete in the Hugging Face cache {constants.HF_HUB_CACHE} "
                                    f"(HF_HUB_OFFLINE=1 reads the cache only; `python -m opcod.hub download {path}` "
                                    "fetches a Hub model where the Hub can be reached)") from None
        raise FileNotFoundError(f"{where} a model the Hugging Face Hub could be asked for "
                                f"({str(exc).splitlines()[0]})") from None
    except (HfHubHTTPError, HFValidationError) as exc:
        raise FileNotFoundError(f"{where} a model on the Hugging Face Hub ({str(exc).splitlines()[0]})") from None


def resolve_all(items: list[tuple[str, str]], files: list[str] | None = None) -> list[str]:
    """resolve() of each (path, config key). Under torch.distributed rank 0 downloads first and the
    others then read its cache, so N ranks never fetch the same 16 GB at once; every rank raises
    rank 0's error, if any."""
    import torch.distributed as dist
    if not any(hub_id(path) for path, _ in items):
        return [path for path, _ in items]
    if not (dist.is_available() and dist.is_initialized()):
        return [resolve(path, key, files) for path, key in items]
    error = [None]
    if dist.get_rank() == 0:
        try:
            for path, key in items:
                resolve(path, key, files)
        except FileNotFoundError as exc:
            error = [str(exc)]
    dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise FileNotFoundError(error[0])
    return [resolve(path, key, files) for path, key in items]


def resolve_students(cfg, files: list[str] | None = None):
    """cfg with every student's path resolved: students named by Hub id become cache snapshots."""
    import torch.distributed as dist
    paths = resolve_all([(s.path, f"students.{i}.path") for i, s in enumerate(cfg.students)], files)
    quiet = dist.is_available() and dist.is_initialized() and dist.get_rank() != 0
    for i, (s, path) in enumerate(zip(cfg.students, paths)):
        if path != s.path:
            if not quiet:
                print(f"students.{i}.path: {s.path} -> {path}", file=sys.stderr)
            s.path = path
    return cfg


def main(argv=None) -> int:
    from . import cli
    ap = cli.parser("python -m opcod.hub", __doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", formatter_class=cli.HelpFormatter,
                       help="fetch models into the Hugging Face cache and print their local folders")
    d.add_argument("models", nargs="+", help="Hub ids, e.g. Qwen/Qwen3-8B or Qwen/Qwen3-8B@<revision>")
    d.add_argument("--all-files", action="store_true",
                   help="every file of the repository, not only the ones opcod reads (" + " ".join(MODEL_FILES) + ")")
    args = cli.parse(ap, argv)
    for i, name in enumerate(args.models):
        if hub_id(name) is None:
            print(f"opcod.hub: {name!r} is not a Hub id (owner/name) or is a local path", file=sys.stderr)
            return 2
        try:
            print(resolve(name, f"models[{i}]", ["*"] if args.all_files else None))
        except FileNotFoundError as exc:
            print(f"opcod.hub: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
