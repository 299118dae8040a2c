"""The problems of a run: every configured domain's train, validation and test split."""
from __future__ import annotations

from pathlib import Path

from .config import Config
from .data import Problem, load_sciknoweval, read_problems, union, validation_split


def load_domains(cfg: Config) -> tuple[list[Problem], dict[str, list[Problem]], dict[str, list[Problem]]]:
    """(union of train splits, validation per domain, test per domain)."""
    train, val, test = [], {}, {}
    for domain in cfg.data.domains:
        if cfg.data.source == "synthetic":
            from .synthetic import splits
            tr, te = splits(domain, cfg.data.synthetic_train + cfg.data.val_size, cfg.data.synthetic_test,
                              cfg.data.split_seed)
        elif cfg.data.source == "sciknoweval":
            tr = load_sciknoweval(cfg.data.path, domain, "train")
            te = load_sciknoweval(cfg.data.path, domain, "test")
        else:
            folder = Path(cfg.data.path) / domain
            tr, te = read_problems(folder / "train.jsonl"), read_problems(folder / "test.jsonl")
        if cfg.data.test_size:
            te = te[:cfg.data.test_size]
        # A synthetic validation split keeps each family's common and specialist share, as its test
        # split does: drawn at random, 6 of the 20 chemistry questions asked about specialist items
        # (4 in proportion), which held a student that knew all common chemistry at a gap of 0.225
        # from a specialist, above tau = 0.2, however well it knew it.
        stratum = None
        if cfg.data.source == "synthetic":
            from .synthetic import stratum
        tr, va = validation_split(tr, cfg.data.val_size, seed=cfg.data.split_seed, stratum=stratum)
        train.append(tr)
        val[domain], test[domain] = va, te
    return union(*train), val, test
