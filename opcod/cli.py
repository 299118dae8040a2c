"""What every opcod command line shares: defaults in --help, options and key=value overrides in any order, --print-config."""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys

import yaml


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Module docstrings keep their line breaks; every option with a default names it. None and
    False are left out: an option that defaults to None says in its help what it falls back to."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is False or default == [] or default == argparse.SUPPRESS
                or not (action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """An ArgumentParser whose --help shows every default, with the module docstring as description."""
    return argparse.ArgumentParser(prog=prog, description=doc, formatter_class=HelpFormatter)


def add_config_args(ap: argparse.ArgumentParser, config_help: str, *, required: bool = False) -> None:
    """--config, --print-config and the key=value overrides, the same in every command."""
    ap.add_argument("--config", required=required, help=config_help)
    ap.add_argument("--print-config", action="store_true",
                    help="print the resolved config (the file, then the overrides) as YAML and exit")
    ap.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                    help="config overrides, before or after the options, e.g. optim.lr=1e-5 rounds=2")


def parse(ap: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Options and positionals (key=value overrides, paths) in any order, as torchrun's and most
    trainers' command lines take them. argparse cannot intermix under subcommands, so a command
    with verbs parses its verb first and the rest with the verb's own parser."""
    argv = list(sys.argv[1:] if argv is None else argv)
    subs = [a for a in ap._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return ap.parse_intermixed_args(argv)
    verbs = subs[0].choices
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if at is None or argv[at] not in verbs:
        return ap.parse_args(argv)  # argparse's own message: the valid verbs, or the help
    ns = verbs[argv[at]].parse_intermixed_args(argv[:at] + argv[at + 1:])
    setattr(ns, subs[0].dest, argv[at])
    return ns


_OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """(paths, key=value overrides) of a command's positionals, for commands that take both: argparse
    gives every positional to the first list. A path never starts like `optim.lr=`."""
    return [i for i in items if not _OVERRIDE.match(i)], [i for i in items if _OVERRIDE.match(i)]


def print_config(cfg) -> None:
    """The resolved config as YAML on stdout: what a run would save as its config.yaml."""
    yaml.safe_dump(dataclasses.asdict(cfg), sys.stdout, sort_keys=False)


def warn_cpu_engine(kind: str, prog: str) -> bool:
    """One line on stderr when the hf engine (a transformers model generating on the CPU) is chosen
    on a machine that has a GPU: nothing else would say why generation is slow."""
    import torch
    if kind != "hf" or not torch.cuda.is_available():
        return False
    print(f"{prog}: warning: engine.kind=hf generates on the CPU although this machine has a GPU; "
          "engine.kind=vllm generates on the GPU (pip install 'opcod[gpu]')", file=sys.stderr)
    return True
