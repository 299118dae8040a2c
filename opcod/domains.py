"""The problems of a run: every configured domain's train, validation and test split."""
from __future__ import annotations

import json
from pathlib import Path

from .config import Config, ConfigError
from .data import Problem, load_sciknoweval, read_problems, union, validation_split


def load_domains(cfg: Config) -> tuple[list[Problem], dict[str, list[Problem]], dict[str, list[Problem]]]:
    """(union of train splits, validation per domain, test per domain)."""
    train, val, test = [], {}, {}
    for domain in cfg.data.domains:
        va = None
        if cfg.data.source == "synthetic":
            from .synthetic import splits
            tr, te = splits(domain, cfg.data.synthetic_train + cfg.data.val_size, cfg.data.synthetic_test,
                              cfg.data.split_seed)
        elif cfg.data.source == "sciknoweval" and not (Path(cfg.data.path) / domain / "train.jsonl").is_file():
            tr = load_sciknoweval(cfg.data.path, domain, "train")
            te = load_sciknoweval(cfg.data.path, domain, "test")
        else:  # a folder of <domain>/{train,test}.jsonl, or what `python -m opcod.data prepare` wrote
            folder = Path(cfg.data.path) / domain
            tr, te = read_problems(folder / "train.jsonl"), read_problems(folder / "test.jsonl")
            if (folder / "validation.jsonl").is_file():
                va = read_problems(folder / "validation.jsonl")
                if len(va) != cfg.data.val_size:
                    raise ConfigError(f"config key 'data.val_size' is {cfg.data.val_size}, but {folder / 'validation.jsonl'} "
                                      f"holds {len(va)} problems: set data.val_size={len(va)}, or prepare the data "
                                      f"again with --val-size {cfg.data.val_size}")
                _check_split_seed(cfg)
        if cfg.data.test_size:
            te = te[:cfg.data.test_size]
        # A synthetic validation split keeps each family's common and specialist share, as its test
        # split does: drawn at random, 6 of the 20 chemistry questions asked about specialist items
        # (4 in proportion), which held a student that knew all common chemistry at a gap of 0.225
        # from a specialist, above tau = 0.2, however well it knew it.
        stratum = None
        if cfg.data.source == "synthetic":
            from .synthetic import stratum
        if va is None:  # carved out of the train split (prepared data holds its own)
            tr, va = validation_split(tr, cfg.data.val_size, seed=cfg.data.split_seed, stratum=stratum)
        train.append(tr)
        val[domain], test[domain] = va, te
    return union(*train), val, test


def _check_split_seed(cfg: Config) -> None:
    """A prepared folder carved its validation split with one seed: a config asking for another
    would silently get the first one."""
    manifest = Path(cfg.data.path) / "prepare.json"
    if manifest.is_file():
        seed = json.loads(manifest.read_text()).get("split_seed", 0)
        if seed != cfg.data.split_seed:
            raise ConfigError(f"config key 'data.split_seed' is {cfg.data.split_seed}, but {manifest.parent} was "
                              f"prepared with --split-seed {seed}: set data.split_seed={seed}, or prepare the data "
                              f"again with --split-seed {cfg.data.split_seed}")
