"""Real architecture definitions, at small sizes, for the extraction tests.

* :class:`ResNet18` -- the CIFAR variant of ResNet-18 (3x3 stem, no max-pool,
  four stages of two basic blocks, widths w, 2w, 4w, 8w), BatchNorm throughout.
* :class:`ViT` -- a Vision Transformer: patch embedding, class token, learned
  positions, pre-norm transformer blocks (``blocks.N``), head on the class token.
* :class:`TextClassifier` -- a BERT-shaped text encoder: ``bert.embeddings``
  (word + position + token type, LayerNorm), post-norm blocks at
  ``bert.encoder.layer.N`` that mask padded keys with the ``attention_mask`` and
  return a tuple like Hugging Face's layers, a pooler on the first token, and a
  classification head; the encoder returns a dict-like :class:`ModelOutput`
  (``last_hidden_state``, ``pooler_output``) and the classifier one with
  ``logits``, as Hugging Face models do.
* :class:`BatchNormCNN` -- a small conv net with BatchNorm, for train-mode checks.

The widths are parameters so that the tests run in seconds on a CPU; the
topology (what the layer names and output shapes look like) is the real one.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ModelOutput(OrderedDict):
    """A dict whose entries are also attributes, like ``transformers.ModelOutput``."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


# --------------------------------------------------------------------------- ResNet-18 (CIFAR)

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        widths, strides = [width, 2 * width, 4 * width, 8 * width], [1, 2, 2, 2]
        cin = width
        for stage, (cout, stride) in enumerate(zip(widths, strides), start=1):
            setattr(self, f"layer{stage}", nn.Sequential(BasicBlock(cin, cout, stride),
                                                         BasicBlock(cout, cout, 1)))
            cin = cout
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Running statistics and affine parameters away from their defaults, so eval mode
    (running statistics) and train mode (batch statistics) give different outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                size = module.num_features
                module.running_mean.copy_(0.3 * torch.randn(size, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(size, generator=gen))
                module.weight.copy_(0.8 + 0.4 * torch.rand(size, generator=gen))
                module.bias.copy_(0.2 * torch.randn(size, generator=gen))


# --------------------------------------------------------------------------- attention

class SelfAttention(nn.Module):
    """Multi-head self-attention; keys where ``mask`` is 0 get no weight at all."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads) \
            .permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(dim // self.heads)
        if mask is not None:
            blocked = (mask == 0)[:, None, None, :]
            scores = scores.masked_fill(blocked, torch.finfo(scores.dtype).min)
        attended = torch.softmax(scores, dim=-1) @ v
        return self.out(attended.transpose(1, 2).reshape(batch, tokens, dim))


# --------------------------------------------------------------------------- ViT

class PatchEmbedding(nn.Module):
    def __init__(self, patch: int, dim: int, channels: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)        # [B, patches, dim]


class PreNormBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, image: int = 16, patch: int = 4, dim: int = 16, depth: int = 2,
                 heads: int = 2, classes: int = 5) -> None:
        super().__init__()
        self.patch_embed = PatchEmbedding(patch, dim)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList(PreNormBlock(dim, heads, 2 * dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x)
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)[:, 0])


# --------------------------------------------------------------------------- BERT-shaped

class Embeddings(nn.Module):
    def __init__(self, vocab: int, dim: int, positions: int) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim, padding_idx=0)
        self.position_embeddings = nn.Embedding(positions, dim)
        self.token_type_embeddings = nn.Embedding(2, dim)
        self.LayerNorm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(0.1)

    def forward(self, input_ids: Tensor, token_type_ids: Optional[Tensor] = None) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        h = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None] \
            + self.token_type_embeddings(types)
        return self.dropout(self.LayerNorm(h))


class EncoderLayer(nn.Module):
    """A post-norm BERT block; returns ``(hidden_states,)`` as Hugging Face layers do."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.attention = SelfAttention(dim, heads)
        self.attention_norm = nn.LayerNorm(dim)
        self.intermediate = nn.Linear(dim, hidden)
        self.output = nn.Linear(hidden, dim)
        self.output_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None):
        x = self.attention_norm(x + self.dropout(self.attention(x, mask)))
        return (self.output_norm(x + self.dropout(self.output(F.gelu(self.intermediate(x))))),)


class Encoder(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, depth: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(EncoderLayer(dim, heads, hidden) for _ in range(depth))

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        for layer in self.layer:
            x = layer(x, mask)[0]
        return x


class Pooler(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class TextEncoder(nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, hidden: int, depth: int,
                 positions: int) -> None:
        super().__init__()
        self.embeddings = Embeddings(vocab, dim, positions)
        self.encoder = Encoder(dim, heads, hidden, depth)
        self.pooler = Pooler(dim)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None) -> ModelOutput:
        hidden = self.encoder(self.embeddings(input_ids, token_type_ids), attention_mask)
        return ModelOutput(last_hidden_state=hidden, pooler_output=self.pooler(hidden))


class TextClassifier(nn.Module):
    """``bert`` (returns a ModelOutput), ``dropout``, ``classifier``: BertForSequenceClassification's
    layout; returns ``ModelOutput(logits=...)``, or ``(pooled, logits)`` with ``tuple_output``."""

    def __init__(self, vocab: int = 50, dim: int = 16, heads: int = 2, hidden: int = 32,
                 depth: int = 2, positions: int = 32, classes: int = 3,
                 tuple_output: bool = False) -> None:
        super().__init__()
        self.bert = TextEncoder(vocab, dim, heads, hidden, depth, positions)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Linear(dim, classes)
        self.tuple_output = tuple_output

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None):
        pooled = self.dropout(self.bert(input_ids, attention_mask, token_type_ids).pooler_output)
        logits = self.classifier(pooled)
        return (pooled, logits) if self.tuple_output else ModelOutput(logits=logits)


# --------------------------------------------------------------------------- BatchNorm CNN

class BatchNormCNN(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8),
                                    nn.ReLU())
        self.head = nn.Linear(8, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block2(self.block1(x)).mean(dim=(2, 3)))
