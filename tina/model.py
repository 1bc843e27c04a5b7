"""The generator: a diffusion transformer (DiT) over parameter tokens, conditioned on class text.

Reads top to bottom: embedders → attention → block → final layer → DiT → size registry.

Token sequence (see tina/layout.py):  [ body tokens (T_body) | class 0 (m) | ... | class K-1 (m) ]
  * body tokens carry a learned position embedding;
  * the m tokens of class i carry a sub-position embedding shared by all classes, plus class i's
    text embedding, both at the input and in a per-token adaLN modulation in every block.
No token knows its class *index*, so permuting the classes (tokens and text alike) permutes the
output exactly: the model is equivariant to class order, and any number of classes works.
Class slots beyond a task's k are padding and are masked out of attention.

Classifier-free guidance: a learned null text embedding replaces every class's embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

try:  # optional fast attention on CUDA (the `gpu` extra)
    import xformers.ops as xops
except Exception:  # noqa: BLE001 - xformers raises various errors on CPU-only installs
    xops = None


@dataclass
class DiTConfig:
    """Architecture of the generator. The first four fields come from the layout and text encoder."""

    token_size: int = 128  # C: numbers per parameter token
    n_body_tokens: int = 0  # T_body: tokens of the shared (non-head) parameters
    tokens_per_class: int = 1  # m: tokens per class's head row
    cond_dim: int = 384  # E: text-embedding width
    width: int = 256  # transformer width
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")


# Named sizes, used as CLI/config choices (DiT's `DiT_models` habit).
DIT_SIZES: dict[str, dict] = {
    "DiT-T": dict(width=128, depth=4, heads=4),
    "DiT-S": dict(width=256, depth=6, heads=4),
    "DiT-M": dict(width=384, depth=8, heads=6),
    "DiT-B": dict(width=768, depth=12, heads=12),
}


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features → MLP (as in DiT)."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]  # (N, half)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))  # (N, W)


class Attention(nn.Module):
    """Multi-head self-attention with a key-padding mask; xformers on CUDA when installed, else SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        N, T, W = x.shape
        q, k, v = self.qkv(x).reshape(N, T, 3, self.heads, W // self.heads).unbind(2)  # 3 × (N, T, H, Dh)
        if xops is not None and x.is_cuda:
            bias = None
            if key_mask is not None:  # additive bias (N, H, T, T); xformers wants a padded last dim
                pad = (-T) % 8
                b = torch.zeros(N, self.heads, T, T + pad, device=x.device, dtype=x.dtype)
                b[..., :T].masked_fill_(~key_mask[:, None, None, :], float("-inf"))
                bias = b[..., :T]
            out = xops.memory_efficient_attention(q, k, v, attn_bias=bias)  # (N, T, H, Dh)
        else:
            mask = None if key_mask is None else key_mask[:, None, None, :]  # (N, 1, 1, T), True = attend
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
            out = out.transpose(1, 2)  # (N, T, H, Dh)
        return self.proj(out.reshape(N, T, W))


class DiTBlock(nn.Module):
    """Pre-LN transformer block with per-token adaLN-Zero modulation."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c, c_index, key_mask):
        # c: (N, 1+K, W) the distinct conditions (body, then each class); c_index (T,) picks one per
        # token. Modulating the 1+K distinct conditions, not T tokens, saves most of adaLN's matmuls.
        s1, g1, b1, s2, g2, b2 = self.ada(c)[:, c_index].chunk(6, dim=-1)  # 6 × (N, T, W)
        x = x + b1 * self.attn(modulate(self.norm1(x), s1, g1), key_mask)
        x = x + b2 * self.mlp(modulate(self.norm2(x), s2, g2))
        return x  # (N, T, W)


class FinalLayer(nn.Module):
    def __init__(self, width: int, out: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, c, c_index):
        shift, scale = self.ada(c)[:, c_index].chunk(2, dim=-1)  # 2 × (N, T, W)
        return self.linear(modulate(self.norm(x), shift, scale))  # (N, T, C)


class DiT(nn.Module):
    """Denoiser over parameter tokens: (xt, t, per-class text) → prediction (x0, eps or v)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        W = cfg.width
        self.in_proj = nn.Linear(cfg.token_size, W)
        self.body_pos = nn.Parameter(torch.zeros(cfg.n_body_tokens, W))
        self.head_pos = nn.Parameter(torch.zeros(cfg.tokens_per_class, W))
        self.t_embed = TimestepEmbedder(W)
        self.cond_proj = nn.Sequential(nn.Linear(cfg.cond_dim, W), nn.SiLU(), nn.Linear(W, W))
        self.pool_proj = nn.Linear(W, W)
        self.null_cond = nn.Parameter(torch.zeros(cfg.cond_dim))  # CFG's learned "no text"
        self.blocks = nn.ModuleList([DiTBlock(W, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.final = FinalLayer(W, cfg.token_size)
        self._init()

    def _init(self):
        def basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(basic)
        nn.init.normal_(self.body_pos, std=0.02)
        nn.init.normal_(self.head_pos, std=0.02)
        nn.init.normal_(self.null_cond, std=0.02)
        # adaLN-Zero: every block starts as the identity and the output as zero.
        for blk in self.blocks:
            nn.init.zeros_(blk.ada[-1].weight)
            nn.init.zeros_(blk.ada[-1].bias)
        nn.init.zeros_(self.final.ada[-1].weight)
        nn.init.zeros_(self.final.ada[-1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def num_tokens(self, K: int) -> int:
        return self.cfg.n_body_tokens + K * self.cfg.tokens_per_class

    def forward(
        self,
        xt: torch.Tensor,  # (N, T, C) noisy tokens, T = T_body + K*m
        t: torch.Tensor,  # (N,) timesteps
        cond: torch.Tensor,  # (N, K, E) per-class text embeddings
        cond_mask: torch.Tensor | None = None,  # (N, K) True for real classes (None: all real)
        uncond: torch.Tensor | None = None,  # (N,) True where the text is replaced by the null embedding
    ) -> torch.Tensor:
        N, K, _ = cond.shape
        Tb, m = self.cfg.n_body_tokens, self.cfg.tokens_per_class
        if xt.shape[1] != Tb + K * m:
            raise ValueError(f"{xt.shape[1]} tokens do not match {K} classes ({Tb} + {K}×{m} expected)")
        if uncond is not None:
            cond = torch.where(uncond[:, None, None], self.null_cond.to(cond.dtype).expand_as(cond), cond)
        if cond_mask is None:
            cond_mask = torch.ones(N, K, dtype=torch.bool, device=cond.device)
        cls = self.cond_proj(cond)  # (N, K, W)
        w = cond_mask[..., None].to(cls.dtype)
        pooled = (cls * w).sum(1) / w.sum(1).clamp_min(1)  # (N, W): order-free summary of the task
        c = self.t_embed(t) + self.pool_proj(pooled)  # (N, W)
        # Token j's condition is c (body) or c + its class's text: index into [c, c+cls_0, ..].
        c_index = torch.cat([torch.zeros(Tb, dtype=torch.long), torch.arange(1, K + 1).repeat_interleave(m)]).to(xt.device)  # (T,)
        conds = torch.cat([c[:, None], c[:, None] + cls], dim=1)  # (N, 1+K, W)
        tok_cond = torch.cat([cls.new_zeros(N, 1, cls.shape[-1]), cls], dim=1)[:, c_index]  # (N, T, W)
        pos = torch.cat([self.body_pos, self.head_pos.repeat(K, 1)], dim=0)  # (T, W)
        x = self.in_proj(xt) + pos + tok_cond  # (N, T, W)
        key_mask = None
        if not bool(cond_mask.all()):
            body_ok = torch.ones(N, Tb, dtype=torch.bool, device=cond.device)
            key_mask = torch.cat([body_ok, cond_mask.repeat_interleave(m, dim=1)], dim=1)  # (N, T)
        for blk in self.blocks:
            x = blk(x, conds, c_index, key_mask)  # (N, T, W)
        return self.final(x, conds, c_index)  # (N, T, C)


def build_dit(size: str, **layout_fields) -> DiT:
    """DiT of a named size; `layout_fields` gives token_size, n_body_tokens, tokens_per_class, cond_dim."""
    if size not in DIT_SIZES:
        raise ValueError(f"unknown generator size {size!r}; choose from {sorted(DIT_SIZES)}")
    return DiT(DiTConfig(**layout_fields, **DIT_SIZES[size]))
