"""A minimal GPT-2-style language model in plain PyTorch: the peer glm's training step is timed against.

What a researcher would write for a small char-level model (the shape nanoGPT popularised): learned
absolute positions, pre-LayerNorm blocks with biases, one fused QKV projection, causal
``scaled_dot_product_attention``, a 4x GELU MLP, tied input/output embeddings, N(0, 0.02) init with the
residual projections scaled by 1/sqrt(2 * layers). No dropout, no glm code.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.fc_out = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, C))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class GPT2(nn.Module):
    def __init__(self, vocab: int, context: int, width: int, layers: int, heads: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.init_weights(layers)

    def init_weights(self, layers: int) -> None:
        for name, p in self.named_parameters():
            with torch.no_grad():
                if p.dim() >= 2:
                    deep = name.endswith(("proj.weight", "fc_out.weight"))
                    p.normal_(0.0, 0.02 / math.sqrt(2 * layers) if deep else 0.02)
                elif "ln" in name and name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: Tensor) -> Tensor:
        """Logits ``[B, T, V]`` (the output projection is the token embedding, transposed)."""
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.tok.weight)


def loss(model: GPT2, x: Tensor, y: Tensor) -> Tensor:
    """Mean next-token cross entropy, every position a target."""
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def optimizer(model: GPT2, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.Optimizer:
    """AdamW with weight decay on every matrix (embeddings included), none on biases and norms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=betas)


def train_step(model: GPT2, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, grad_clip: float = 1.0) -> float:
    """One full step: forward, loss, backward, gradient clipping, AdamW. Returns the loss."""
    opt.zero_grad(set_to_none=True)
    value = loss(model, x, y)
    value.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return float(value.detach())
