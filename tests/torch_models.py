# SPDX-License-Identifier: MIT
"""A small real model, its data and checkpoint helpers, shared by the torch drop-in tests."""

from __future__ import annotations

import io

import torch

nn = torch.nn
F = torch.nn.functional


class TinyClassifier(nn.Module):
    """Embedding, two linear layers with biases and a LayerNorm: every kind of param a model has."""

    def __init__(self, vocab: int = 50, dim: int = 16, hidden: int = 32, classes: int = 7):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, tokens):
        h = self.embed(tokens).mean(dim=1)
        return self.fc2(self.norm(F.gelu(self.fc1(h))))


def make_model(seed: int = 0) -> TinyClassifier:
    torch.manual_seed(seed)
    return TinyClassifier()


def batches(seed: int):
    """An endless, reproducible stream of (tokens, labels) batches."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, 50, (8, 5), generator=gen), torch.randint(0, 7, (8,), generator=gen)


def backward(model, batch) -> float:
    tokens, labels = batch
    loss = F.cross_entropy(model(tokens), labels)
    loss.backward()
    return loss.item()


def two_groups(model, **first):
    named = dict(model.named_parameters())
    head = [named[n] for n in ("embed.weight", "fc1.weight", "fc1.bias")]
    tail = [p for n, p in named.items() if n not in ("embed.weight", "fc1.weight", "fc1.bias")]
    return [{"params": head, **first}, {"params": tail}]


def save_and_load(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)
