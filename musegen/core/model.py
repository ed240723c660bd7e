"""The CP / REMI Transformer: per-field embeddings, relative attention, type-first heads.

One decoder backbone serves both representations. A CP word is F = 8 ids (type first, then
bar_beat, tempo, chord, pitch, duration, velocity, rest); a REMI token is F = 1 id. Read
bottom-up: field embeddings, relative-position helpers, attention, block, KV cache, config,
model. Shapes: B batch, T (Tq) new positions, Tk keys (cache + new), F fields, D d_model,
H heads, Dh = D / H, E_f embedding size of field f, V_f vocab size of field f.

Papers: CP = Hsiao et al., AAAI 2021 (arXiv 2101.02402); Music Transformer = Huang et al.,
ICLR 2019 (arXiv 1809.04281); init follows nanoGPT (Karpathy) / GPT-2.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from musegen.config import ParamsError

ATTENTION_KINDS = ("relative", "absolute")
#: how relative attention is computed; all are exact and tested equal to "skew" (the
#: reference). "auto" picks per device: "skew" on CPU (measured fastest there by
#: bench.train_throughput), "flex" (FlexAttention, compiled) on CUDA, where the T x T bias
#: keeps SDPA off its fused kernels. FlexAttention has no CPU backward (torch 2.13).
ATTENTION_IMPLS = ("auto", "skew", "gather", "flex")


class FieldEmbedding(nn.Module):
    """One table per field, each scaled by sqrt(its size), concatenated, projected to D (CP §3)."""

    def __init__(self, vocab_sizes: Sequence[int], emb_sizes: Sequence[int], d_model: int):
        super().__init__()
        self.tables = nn.ModuleList(
            nn.Embedding(v, e) for v, e in zip(vocab_sizes, emb_sizes, strict=True)
        )
        self.scales = [math.sqrt(e) for e in emb_sizes]  # Vaswani et al. 2017 §3.4 scaling
        self.proj = nn.Linear(sum(emb_sizes), d_model)

    def embed_field(self, f: int, ids: Tensor) -> Tensor:
        """(B, T) ids of field f -> (B, T, E_f) scaled embeddings."""
        return self.tables[f](ids) * self.scales[f]

    def forward(self, x: Tensor) -> Tensor:
        parts = [self.embed_field(f, x[..., f]) for f in range(x.size(-1))]
        return self.proj(torch.cat(parts, dim=-1))  # (B, T, sum E_f) -> (B, T, D)


def sinusoidal(pos: Tensor, d_model: int) -> Tensor:
    """(T,) absolute positions -> (T, D) sine/cosine encodings (Vaswani et al. 2017 §3.5).

    Computed from the positions themselves, not a table, so any position has an encoding
    (the CP paper uses the same, with a 20000-long table).
    """
    half = d_model // 2
    freq = torch.exp(torch.arange(half, device=pos.device) * (-math.log(10000.0) / half))
    angle = pos.float()[:, None] * freq[None, :]  # (T, D/2)
    return torch.cat([angle.sin(), angle.cos()], dim=-1)  # (T, D), halves not interleaved


def causal_mask(
    t_q: int, t_k: int, window: int | None = None, device: torch.device | None = None
) -> Tensor:
    """Boolean (Tq, Tk) mask, True = may attend; the Tq queries are the last Tq keys.

    With `window`, a query also ignores keys `window` or more positions back (local
    attention), which is what a cache trimmed to window - 1 positions sees at each step.
    """
    q_at = torch.arange(t_k - t_q, t_k, device=device)[:, None]  # (Tq, 1) key index of query
    k_at = torch.arange(t_k, device=device)[None, :]  # (1, Tk)
    allowed = k_at <= q_at
    if window is not None:
        allowed &= k_at > q_at - window
    return allowed


def skew(qe: Tensor) -> Tensor:
    """Music Transformer's memory-efficient skew (Huang et al. 2019, §3.4.1), for a cache too.

    Args:
        qe: (..., Tq, Tk) with qe[i, m] = q_i · E_r[m], where column m stands for distance
            Tk - 1 - m (farthest first) and query i sits at key index Tk - Tq + i.

    Returns:
        (..., Tq, Tk) S_rel with S_rel[i, j] = q_i · E_r[dist(i, j)] on and below the causal
        diagonal (j <= Tk - Tq + i); entries above it are garbage and must be masked.
    """
    *lead, t_q, t_k = qe.shape
    padded = F.pad(qe, (1, 0))  # (..., Tq, Tk + 1): zero column on the left, same dtype/device
    flat = padded.reshape(*lead, t_q * (t_k + 1))  # (..., Tq * (Tk + 1))
    # Dropping the first Tq entries is the paper's "drop the first row" when Tq == Tk; then
    # row i starts at padded[i, Tq - i], so S[i, j] = padded[i, Tq - i + j] = qe[i, Tq-1-i+j].
    return flat[..., t_q:].reshape(*lead, t_q, t_k)  # (..., Tq, Tk)


def _distances(t_q: int, t_k: int, n_dist: int, device: torch.device) -> Tensor:
    """(Tq, Tk) distance of each key from each query, clipped to [0, n_dist - 1].

    The Tq queries are the last Tq keys; entries above the causal diagonal clip to 0 (they
    are masked anyway).
    """
    q_at = torch.arange(t_k - t_q, t_k, device=device)[:, None]  # (Tq, 1)
    return (q_at - torch.arange(t_k, device=device)[None, :]).clamp(0, n_dist - 1)  # (Tq, Tk)


def relative_logits(q: Tensor, rel: Tensor, t_k: int) -> Tensor:
    """S_rel for queries q (B, H, Tq, Dh) against the last Tk keys, via `skew` (reference).

    `rel` holds one learned vector per distance 0..max_len-1: (max_len, Dh) shared by the
    heads of a layer, or (H, max_len, Dh) per head; distances past max_len - 1 are clipped
    to the farthest vector.
    """
    dist = (t_k - 1 - torch.arange(t_k, device=q.device)).clamp(max=rel.size(-2) - 1)  # (Tk,)
    # (B, H, Tq, Dh) @ (Dh, Tk) or (H, Dh, Tk) -> (B, H, Tq, Tk)
    qe = q @ rel[..., dist, :].transpose(-2, -1)
    return skew(qe)


def relative_logits_gather(q: Tensor, rel: Tensor, t_k: int) -> Tensor:
    """`relative_logits` by a gather: q · E_r for every distance, then picked per (i, j).

    Costs Tq x min(Tk, max_len) dot products (the skew pays Tq x Tk) and one gather; the
    result equals the skew's on and below the causal diagonal (0-distance above it).
    """
    t_q, n_dist = q.size(-2), min(t_k, rel.size(-2))
    qe = q @ rel[..., :n_dist, :].transpose(-2, -1)  # (B, H, Tq, n_dist): q_i · E_r[d]
    dist = _distances(t_q, t_k, n_dist, q.device)  # (Tq, Tk)
    return qe.gather(-1, dist.expand(*qe.shape[:-1], t_k))  # (B, H, Tq, Tk)


@functools.cache
def _compiled_flex() -> Any:
    """FlexAttention compiled once per process (eager flex materialises the scores)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=32)
def _flex_mask(t_q: int, t_k: int, window: int | None, device: str) -> Any:
    """Causal (optionally local) block mask for Tq queries that are the last Tq of Tk keys."""
    from torch.nn.attention.flex_attention import create_block_mask

    offset = t_k - t_q

    def allowed(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        ok = kv_idx <= q_idx + offset
        return ok & (kv_idx > q_idx + offset - window) if window is not None else ok

    return create_block_mask(allowed, None, None, t_q, t_k, device=device)


def flex_relative_attention(
    q: Tensor, k: Tensor, v: Tensor, rel: Tensor, window: int | None
) -> Tensor:
    """Causal relative attention through FlexAttention; the T x T logits never exist.

    `score_mod` adds q_i · E_r[dist(i, j)] / sqrt(Dh), read from the precomputed
    (B, H, Tq, n_dist) product (PyTorch FlexAttention docs, "relative position"); a causal
    block mask skips the blocks above the diagonal. Compiled on CUDA; eager (forward only,
    for tests) on CPU, where FlexAttention has no backward (torch 2.13).
    """
    from torch.nn.attention.flex_attention import flex_attention

    t_q, t_k = q.size(-2), k.size(-2)
    n_dist, offset = min(t_k, rel.size(-2)), t_k - t_q
    qe = (q @ rel[..., :n_dist, :].transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B,H,Tq,n)

    def add_relative(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        dist = (q_idx + offset - kv_idx).clamp(0, n_dist - 1)  # masked entries clip to 0
        return score + qe[b, h, q_idx, dist]

    mask = _flex_mask(t_q, t_k, window, str(q.device))
    attend = _compiled_flex() if q.is_cuda else flex_attention
    return attend(q, k, v, score_mod=add_relative, block_mask=mask)  # (B, H, Tq, Dh)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, plain or with Music Transformer relative positions.

    `impl` (one of ATTENTION_IMPLS, set through `MusicTransformer.set_attention_impl`) says
    how the relative term is computed; every choice gives the same numbers (tests).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)  # residual projection
        d_head = config.d_model // config.n_head
        self.rel: nn.Parameter | None = None
        if config.attention == "relative":  # one E_r per layer (max_len, Dh), or per head
            heads = (config.n_head,) if config.rel_per_head else ()
            self.rel = nn.Parameter(torch.zeros(*heads, config.max_len, d_head))
        self.impl = "auto"

    def resolved_impl(self, device: torch.device) -> str:
        """The relative-attention path "auto" stands for on `device` (measured, README)."""
        if self.impl != "auto":
            return self.impl
        return "flex" if device.type == "cuda" else "skew"

    def forward(
        self, x: Tensor, past: tuple[Tensor, Tensor] | None, window: int | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, Tq, D), cached keys/values (B, H, Tk - Tq, Dh) -> (B, Tq, D), new keys/values."""
        B, t_q, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)  # 3 x (B, Tq, D)
        q, k, v = (t.view(B, t_q, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        # q, k, v: (B, H, Tq, Dh)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, H, Tk, Dh)
            v = torch.cat([past[1], v], dim=2)
        t_k = k.size(2)
        drop = self.dropout if self.training else 0.0
        impl = self.resolved_impl(x.device) if self.rel is not None else None
        if impl == "flex" and t_q > 1:
            if drop > 0:
                warnings.warn(
                    "flex relative attention applies no dropout to the attention weights "
                    "(residual and embedding dropout still apply)",
                    stacklevel=2,
                )
            y = flex_relative_attention(q, k, v, self.rel, window)
            y = y.transpose(1, 2).reshape(B, t_q, D)  # (B, H, Tq, Dh) -> (B, Tq, D)
            return self.proj(y), (k, v)
        bias: Tensor | None = None  # None: plain causal over a full sequence (is_causal)
        if self.rel is not None or window is not None or t_q not in (t_k, 1):
            allowed = causal_mask(t_q, t_k, window, x.device)  # (Tq, Tk)
            bias = allowed
            if self.rel is not None:
                # SDPA adds the mask after scaling QK^T, so S_rel / sqrt(Dh) gives
                # (QK^T + S_rel) / sqrt(Dh) (Huang et al. eq. 3).
                rel_logits = relative_logits if impl == "skew" else relative_logits_gather
                s_rel = rel_logits(q, self.rel, t_k) / math.sqrt(q.size(-1))
                bias = s_rel.to(q.dtype).masked_fill(~allowed, float("-inf"))  # (B, H, Tq, Tk)
        if t_q == 1:
            # One new token (decoding): two small matmuls. SDPA may pick cuDNN here, which
            # builds a graph per key length (H100, paper scale: 60 vs 6 ms per word, measured).
            att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, 1, Tk)
            if bias is not None and bias.dtype == torch.bool:
                att = att.masked_fill(~bias, float("-inf"))
            elif bias is not None:
                att = att + bias
            y = F.dropout(att.softmax(dim=-1), drop) @ v  # (B, H, 1, Dh)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=drop, is_causal=bias is None
            )
        y = y.transpose(1, 2).reshape(B, t_q, D)  # (B, H, Tq, Dh) -> (B, Tq, D)
        return self.proj(y), (k, v)


class Block(nn.Module):
    """Pre-LN decoder block: x + attn(ln(x)), then x + mlp(ln(x)) (GPT-2 layout)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, config.d_ff),
            nn.GELU(),  # the CP paper's activation
            nn.Linear(config.d_ff, config.d_model),  # residual projection
        )
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, past: tuple[Tensor, Tensor] | None, window: int | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        a, kv = self.attn(self.ln_1(x), past, window)
        x = x + self.drop(a)
        return x + self.drop(self.mlp(self.ln_2(x))), kv


@dataclass
class KVCache:
    """Per-layer keys and values of the positions seen so far, for incremental decoding.

    Sliding window: `trim(n)` keeps the newest n positions. Generation that calls
    `cache.trim(max_len - 1)` before feeding each new word keeps every attention span within
    max_len and equals a full `model.hidden(x, window=max_len)` over the whole stream (each
    position attends to itself and the max_len - 1 before it, at every layer). The kept
    keys/values still carry what their own windows saw, like Transformer-XL memory; with one
    layer this equals a plain forward over the last max_len words (relative attention).

    Attributes:
        keys: one (B, H, T_cached, Dh) tensor per layer.
        values: same shapes as keys.
        pos: absolute position of the next token (trimmed positions still count; the
            absolute-attention variant encodes positions from the start of the stream).
    """

    keys: list[Tensor]
    values: list[Tensor]
    pos: int

    def __len__(self) -> int:
        """Number of cached positions (at most the trim length after `trim`)."""
        return self.keys[0].size(2) if self.keys else 0

    def trim(self, n: int) -> KVCache:
        """A cache holding only the newest `n` positions (the oldest are dropped)."""
        if n < 0:
            raise ValueError(f"KVCache.trim: n must be >= 0, got {n}")
        start = max(len(self) - n, 0)  # not k[-n:]: -0 would keep everything
        keys = [k[:, :, start:] for k in self.keys]
        return KVCache(keys, [v[:, :, start:] for v in self.values], self.pos)


@dataclass(frozen=True)
class ModelParams:
    """The `model:` section of params.yaml (load with `config.load_section`).

    `emb_sizes` maps field names to embedding sizes; it may list the fields of every
    representation (CP fields and REMI's `token`), and each model takes the ones its
    vocab names.
    """

    emb_sizes: Mapping[str, int]
    d_model: int
    n_layer: int
    n_head: int
    d_ff: int
    dropout: float
    max_len: int
    attention: str
    rel_per_head: bool


@dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the model's shapes; stored in checkpoints (`dataclasses.asdict`).

    Build with `ModelConfig.from_params(params, vocab)` or directly; lists are accepted for
    the tuples so a dict loaded from a checkpoint rebuilds it: `ModelConfig(**d)`.
    """

    vocab_sizes: tuple[int, ...]  # per field, field 0 = type (CP) or token (REMI)
    emb_sizes: tuple[int, ...]  # per field, same order
    d_model: int
    n_layer: int
    n_head: int
    d_ff: int
    dropout: float
    max_len: int  # context window and number of relative distances
    attention: str  # "relative" | "absolute"
    rel_per_head: bool = False  # one E_r per head (H, max_len, Dh); older checkpoints: shared

    def __post_init__(self) -> None:
        object.__setattr__(self, "vocab_sizes", tuple(int(v) for v in self.vocab_sizes))
        object.__setattr__(self, "emb_sizes", tuple(int(e) for e in self.emb_sizes))
        problems = []
        if len(self.vocab_sizes) != len(self.emb_sizes) or not self.vocab_sizes:
            problems.append(f"{len(self.vocab_sizes)} vocab sizes vs {len(self.emb_sizes)} emb")
        if min(self.vocab_sizes + self.emb_sizes, default=0) < 1:
            problems.append("every vocab and embedding size must be >= 1")
        if self.d_model % (2 * self.n_head) or self.n_head < 1:
            problems.append(f"d_model {self.d_model} must be a multiple of 2 * n_head")
        if min(self.n_layer, self.d_ff, self.max_len) < 1 or not 0 <= self.dropout < 1:
            problems.append("n_layer, d_ff, max_len must be >= 1 and dropout in [0, 1)")
        if self.attention not in ATTENTION_KINDS:
            problems.append(f"attention {self.attention!r} is not one of {ATTENTION_KINDS}")
        if problems:
            raise ValueError(f"ModelConfig: {'; '.join(problems)} (fix the model section)")

    @classmethod
    def from_params(cls, params: ModelParams, vocab: Mapping[str, Any]) -> ModelConfig:
        """Combine the `model:` section with a vocab.json mapping ("fields", "sizes").

        Raises:
            ParamsError: vocab.json lacks fields/sizes, or model.emb_sizes has no entry for
                one of its fields.
        """
        fields, sizes = vocab.get("fields"), vocab.get("sizes")
        if not fields or sizes is None:
            raise ParamsError(
                "vocab.json: expected 'fields' and 'sizes' (rerun the tokenize stage)"
            )
        if isinstance(sizes, Mapping):  # accept sizes keyed by field name as well as a list
            sizes = [sizes[f] for f in fields]
        missing = [f for f in fields if f not in params.emb_sizes]
        if missing:
            known = ", ".join(params.emb_sizes)
            raise ParamsError(
                f"params.yaml: model.emb_sizes has no entry for field {missing[0]!r} "
                f"(it has: {known}); add `{missing[0]}: <size>` under model.emb_sizes"
            )
        kw = {f.name: getattr(params, f.name) for f in dataclasses.fields(ModelParams)}
        kw["emb_sizes"] = tuple(params.emb_sizes[f] for f in fields)
        return cls(vocab_sizes=tuple(sizes), **kw)


class MusicTransformer(nn.Module):
    """Decoder-only Transformer over CP words (F fields) or REMI tokens (F = 1).

    Build with `MusicTransformer(ModelConfig(...))`. Type-first heads (CP §3): the type head
    reads the final hidden state h; every other field's head reads
    Linear(D + E_type -> D)(concat(h, emb(next type))), where the next type is the ground
    truth in training and the sampled one in generation. The type embedding there is the
    input one (`embed.tables[0]`, scaled), as in the official CP code.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = FieldEmbedding(config.vocab_sizes, config.emb_sizes, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        n_fields, d = len(config.vocab_sizes), config.d_model
        self.type_proj = nn.Linear(d + config.emb_sizes[0], d) if n_fields > 1 else None
        self.heads = nn.ModuleList(nn.Linear(d, v) for v in config.vocab_sizes)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) (two per block)
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * config.n_layer))
            elif name.endswith("attn.rel"):
                nn.init.normal_(p, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def n_fields(self) -> int:
        """F: 8 for CP words, 1 for REMI."""
        return len(self.config.vocab_sizes)

    def set_attention_impl(self, impl: str) -> MusicTransformer:
        """Choose how relative attention is computed: one of ATTENTION_IMPLS (default auto).

        Every path gives the same numbers (tests: equal to "skew" within 1e-5 in float32);
        "flex" trains only on CUDA (no CPU backward in torch 2.13).
        """
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention impl {impl!r} is not one of {ATTENTION_IMPLS}")
        for block in self.blocks:
            block.attn.impl = impl
        return self

    def _check_ids(self, ids: Tensor, sizes: Sequence[int], what: str) -> None:
        """Raise on float ids, or (CPU only) on ids outside [0, V_f); ids: (..., len(sizes))."""
        if ids.is_floating_point():
            raise TypeError(f"{what}: expected integer ids, got {ids.dtype}")
        if ids.device.type != "cpu" or not ids.numel():
            return  # a range check on CUDA costs a host sync per step; nn.Embedding asserts
        low, high = ids.reshape(-1, len(sizes)).aminmax(dim=0)  # (F,) each
        for f, size in enumerate(sizes):
            if low[f] < 0 or high[f] >= size:
                found = f"[{int(low[f])}, {int(high[f])}]"
                raise ValueError(f"{what}: field {f} ids must lie in [0, {size}), found {found}")

    def hidden(
        self, x: Tensor, cache: KVCache | None = None, *, window: int | None = None
    ) -> tuple[Tensor, KVCache]:
        """Final hidden states for x, continuing `cache` if given.

        Args:
            x: LongTensor (B, T, F) of the new positions.
            cache: keys/values of earlier positions (from a previous call), or None.
            window: local attention span (see `KVCache`); None attends to everything.

        Returns:
            h (B, T, D) after the final LayerNorm, and the cache extended by these T positions.
        """
        if x.dim() != 3 or x.size(-1) != self.n_fields or x.size(1) == 0:
            raise ValueError(
                f"MusicTransformer: expected ids of shape (B, T, {self.n_fields}) with T >= 1, "
                f"got {tuple(x.shape)} (REMI token arrays need x[..., None])"
            )
        self._check_ids(x, self.config.vocab_sizes, "x")
        start = cache.pos if cache is not None else 0
        # The residual stream keeps the parameters' dtype (float32 under autocast, as nanoGPT).
        h = self.embed(x).to(self.ln_f.weight.dtype)  # (B, T, D)
        if self.config.attention == "absolute":
            pos = torch.arange(start, start + x.size(1), device=x.device)
            h = h + sinusoidal(pos, self.config.d_model).to(h.dtype)  # (T, D) broadcast over B
        h = self.drop(h)
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            past = (cache.keys[i], cache.values[i]) if cache is not None else None
            h, (k, v) = block(h, past, window)
            keys.append(k)
            values.append(v)
        return self.ln_f(h), KVCache(keys, values, start + x.size(1))

    def head_logits(self, h: Tensor, next_type: Tensor | None = None) -> list[Tensor]:
        """Per-field logits from hidden states h (B, T, D).

        Args:
            h: output of `hidden`.
            next_type: (B, T) type id of the word each position predicts; must be None for
                REMI. None for CP returns only the type logits, so a sampler can draw the type
                and call again with it.

        Returns:
            One (B, T, V_f) tensor per field: F of them, or 1 (type only / REMI).
        """
        logits = [self.heads[0](h)]  # (B, T, V_0)
        if next_type is None:
            return logits
        if self.type_proj is None:
            raise ValueError("next_type is only for CP (F > 1); this model has one field")
        if next_type.shape != h.shape[:2]:
            raise ValueError(
                f"next_type: expected shape {tuple(h.shape[:2])}, got {next_type.shape}"
            )
        self._check_ids(next_type[..., None], self.config.vocab_sizes[:1], "next_type")
        e_type = self.embed.embed_field(0, next_type).to(h.dtype)  # (B, T, E_type)
        y = self.type_proj(torch.cat([h, e_type], dim=-1))  # (B, T, D + E_type) -> (B, T, D)
        return logits + [head(y) for head in self.heads[1:]]

    def forward(self, x: Tensor, next_type: Tensor | None = None) -> list[Tensor]:
        """Logits for every field: x (B, T, F) -> F tensors (B, T, V_f).

        Equals `head_logits(hidden(x)[0], next_type)`. `next_type` (B, T) is the type of the
        next word (teacher forcing: x[:, 1:, 0] with one more) and is required when F > 1.
        """
        if self.n_fields > 1 and next_type is None:
            raise ValueError("forward: next_type (B, T) is required for CP (type-first heads)")
        return self.head_logits(self.hidden(x)[0], next_type)

    def num_params(self) -> int:
        """All parameters, embeddings included."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Analytic forward FLOPs per token at context `seq_len` (default max_len), for MFU.

        2 * N_matmul + n_layer * c * seq_len * D, where N_matmul counts the weights of every
        Linear (embedding lookups are free), and c = 4 (QK^T and AV, 2 FLOPs per
        multiply-add) plus 2 for relative attention's Q E_r^T. Like PaLM (Chowdhery et al.
        2022, App. B) it ignores causal masking, biases, norms and softmax. Training ≈ 3x.
        """
        t = self.config.max_len if seq_len is None else seq_len
        n_matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        per_layer = (6 if self.config.attention == "relative" else 4) * t * self.config.d_model
        return 2 * n_matmul + self.config.n_layer * per_layer


class Decoder:
    """Batched incremental decoding for generation: B streams, one new word each per step.

    Build with `Decoder(model, batch)`, `prime(i, words)` each stream with its prompt, then
    `step(words)` once per word. Equal to `KVCache` decoding trimmed to max_len - 1 (and so
    to `model.hidden(x, window=max_len)` over each stream; tests), but lean per word:

    - keys/values live in a preallocated ring of W = max_len slots per layer (values
      (B, H, W, Dh), keys transposed (B, H, Dh, W));
      the new word overwrites the oldest slot, so nothing is copied or concatenated. Slot s
      holds the word (c - s) mod W positions back (c = the step counter, shared by the
      streams), which is its relative distance, and E_r flipped and doubled gives the
      distance vectors in slot order as one slice; slots a stream has not written are
      masked until the step has written every slot. Every step reads all W slots: a
      narrower read while the ring fills would make a stream's sums depend on the other
      streams' prompt lengths (rounding), and a piece must be the same alone or in a batch;
    - the field embeddings and their projection are folded into one table (sum_f V_f, D),
      the CP type projection's embedding half into a (V_type, D) table, and the heads of the
      non-type fields into one matmul: three ops where the model takes about twenty;
    - the blocks' weights are called functionally (no module dispatch per layer); no id
      checks (the sampler draws legal ids) and no host syncs.

    The folded tables hold the weights at build time: build a new Decoder after training.
    `torch.compile` of the step was measured and not kept (README, Limits).
    """

    def __init__(self, model: MusicTransformer, batch: int):
        cfg, p = model.config, next(model.parameters())
        self.model, self.window, self.batch = model, cfg.max_len, batch
        d_head = cfg.d_model // cfg.n_head
        ring = (batch, cfg.n_head, cfg.max_len, d_head)
        # keys transposed (B, H, Dh, W): q @ keys is then a plain (1, Dh) @ (Dh, W) product,
        # ~2x faster than against a transposed (W, Dh) ring (measured, 1 thread)
        self.keys = [p.new_zeros(batch, cfg.n_head, d_head, cfg.max_len) for _ in model.blocks]
        self.values = [p.new_zeros(ring) for _ in model.blocks]  # (B, H, W, Dh) per layer
        # (B, 1, 1, W) added to the scores: -inf on slots a stream has not written yet
        self.bias = torch.full((batch, 1, 1, cfg.max_len), float("-inf"), device=p.device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=p.device)  # next position
        self.count = 0  # c: steps taken; the next word goes to slot c mod W
        with torch.no_grad():
            # slot s holds the word (c - s) mod W back; with E_r flipped and doubled along the
            # distances, its vectors in slot order are one slice (a view, no gather):
            # rel2[W - 1 - c + s] = E_r[(c - s) mod W] for s in 0..W-1 (c = slot in 0..W-1),
            # stored transposed like the keys
            self.rel2 = [
                torch.cat([b.attn.rel.flip(-2)] * 2, -2).transpose(-2, -1).contiguous()
                if b.attn.rel is not None
                else None
                for b in model.blocks
            ]  # (Dh, 2W) or (H, Dh, 2W) per layer
            # each block's weights and biases, looked up once, the linear layers' weights
            # stored transposed (in, out) for a plain addmm (measured ~1.3x faster per call
            # than F.linear's transposed view at 1 and 8 rows, 1 thread), and the query rows of
            # qkv divided by sqrt(Dh): the scores need no division
            self.weights = []
            for b in model.blocks:
                qkv_w, qkv_b = b.attn.qkv.weight.clone(), b.attn.qkv.bias.clone()
                qkv_w[: cfg.d_model] /= math.sqrt(d_head)
                qkv_b[: cfg.d_model] /= math.sqrt(d_head)
                lin = [(m.weight.T.contiguous(), m.bias) for m in (b.attn.proj, b.mlp[0], b.mlp[2])]
                (proj_w, proj_b), (fc_w, fc_b), (out_w, out_b) = lin
                self.weights.append(
                    (b.ln_1.weight, b.ln_1.bias, qkv_w.T.contiguous(), qkv_b, proj_w, proj_b,
                     b.ln_2.weight, b.ln_2.bias, fc_w, fc_b, out_w, out_b)
                )  # fmt: skip
            emb = model.embed
            parts, start = [], 0  # proj(cat_f(e_f * s_f)) = sum_f (E_f * s_f) @ P_f^T + b
            for table, scale in zip(emb.tables, emb.scales, strict=True):
                cols = emb.proj.weight[:, start : start + table.embedding_dim]  # (D, E_f)
                parts.append((table.weight * scale) @ cols.T)  # (V_f, D)
                start += table.embedding_dim
            parts[0] = parts[0] + emb.proj.bias
            self.table = torch.cat(parts)  # (sum V_f, D)
            # looked up once: a module attribute or ModuleList index costs microseconds a word
            self.n_head, self.eps = cfg.n_head, model.blocks[0].ln_1.eps
            self.absolute = cfg.attention == "absolute"
            self.ln_f = (model.ln_f.weight, model.ln_f.bias, model.ln_f.eps)
            self.type_head = (model.heads[0].bias, model.heads[0].weight.T)  # addmm's operands
            sizes = torch.tensor(cfg.vocab_sizes, device=p.device)
            self.offsets = torch.cumsum(sizes, 0) - sizes  # (F,) first row of each field
            if model.type_proj is not None:
                d = cfg.d_model
                w_h, w_e = model.type_proj.weight[:, :d], model.type_proj.weight[:, d:]
                self.type_h = w_h  # (D, D)
                e_type = emb.tables[0].weight * emb.scales[0]  # (V_type, E_type)
                self.type_e = e_type @ w_e.T + model.type_proj.bias  # (V_type, D)
                self.heads_w = torch.cat([h.weight for h in model.heads[1:]])  # (sum V, D)
                self.heads_b = torch.cat([h.bias for h in model.heads[1:]])
                self.split = [h.out_features for h in model.heads[1:]]

    def prime(self, i: int, words: Tensor) -> Tensor:
        """Feed stream i its opening (T, F) words; return its last hidden state (D,).

        Chunks of at most max_len words through `model.hidden` (attention memory O(W^2)),
        then the newest W - 1 keys/values go into row i of the ring, ending at slot c - 1.
        Prime every stream before the first `step` (the step stops masking unwritten slots
        once it has written each slot itself).
        """
        if self.count:
            raise ValueError("Decoder.prime: prime every stream before the first step")
        cache, h = None, None
        for s in range(0, len(words), self.window):
            cache = cache.trim(self.window - 1) if cache is not None else None
            chunk = words[None, s : s + self.window]  # (1, T, F)
            win = self.window if chunk.size(1) > 1 else None
            h, cache = self.model.hidden(chunk, cache, window=win)
        assert h is not None and cache is not None
        cache = cache.trim(self.window - 1)
        n = len(cache)
        slots = (self.count - n + torch.arange(n, device=h.device)) % self.window  # (n,)
        for keys, kept in zip(self.keys, cache.keys, strict=True):
            keys[i].index_copy_(2, slots, kept[0].transpose(1, 2))  # (H, Dh, n) into (H, Dh, W)
        for values, kept in zip(self.values, cache.values, strict=True):
            values[i].index_copy_(1, slots, kept[0])  # (H, n, Dh) into (H, W, Dh)
        self.bias[i, ..., slots], self.pos[i] = 0.0, cache.pos
        return h[0, -1]

    def keep(self, rows: Tensor) -> None:
        """Drop the streams not in `rows` (finished pieces), in that order."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.bias, self.pos, self.batch = self.bias[rows], self.pos[rows], len(rows)

    def step(self, words: Tensor) -> Tensor:
        """Feed one word per stream, words (B, F); return the final hidden states (B, D).

        Functional calls on the blocks' weights (no module dispatch), the relative term read
        from a slice of the doubled E_r and added to q · keys in one baddbmm (q pre-scaled by
        1 / sqrt(Dh)), and the unwritten-slot bias skipped once every slot has been written
        (after W steps): about 20 ops per layer.
        """
        W = self.window
        h = self.table[words + self.offsets].sum(1)  # (B, F, D) -> (B, D)
        if self.absolute:
            h = h + sinusoidal(self.pos, h.size(-1)).to(h.dtype)  # (B, D)
            self.pos += 1
        slot = self.count % W
        masked = self.count < W  # some stream may still have slots nothing was written to
        if masked:
            self.bias[..., slot] = 0.0  # the new word's slot is in use from now on
        B, D = h.shape
        H, eps = self.n_head, self.eps
        for weights, keys, values, rel2 in zip(
            self.weights, self.keys, self.values, self.rel2, strict=True
        ):
            ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, out_w, out_b = (
                weights
            )
            x = torch.layer_norm(h, (D,), ln1_w, ln1_b, eps)  # F.layer_norm's kernel, direct
            qkv = torch.addmm(qkv_b, x, qkv_w).view(B, 3, H, 1, -1)
            q, k, v = qkv.unbind(1)  # 3 x (B, H, 1, Dh); q already divided by sqrt(Dh)
            keys.select(3, slot).copy_(k.squeeze(2))  # over the word W positions back
            values.select(2, slot).copy_(v.squeeze(2))
            flat_q = q.reshape(B * H, 1, -1)  # (B * H, 1, Dh)
            flat_keys = keys.view(B * H, -1, W)  # (B * H, Dh, W)
            if rel2 is None:
                att = torch.bmm(flat_q, flat_keys)  # (B * H, 1, W)
            else:  # q · keys + q · E_r[distance of each slot] (Huang et al. eq. 3), one baddbmm
                e = rel2.narrow(-1, W - 1 - slot, W)  # (Dh, W) or (H, Dh, W) view
                rel = flat_q.view(B * H, -1) @ e if e.dim() == 2 else q @ e  # shared: one mm
                att = torch.baddbmm(rel.view(B * H, 1, W), flat_q, flat_keys)
            att = att.view(B, H, 1, W)
            if masked:
                att = att + self.bias
            y = torch.bmm(att.softmax(dim=-1).view(B * H, 1, W), values.view(B * H, W, -1))
            y = y.view(B, D)  # (B * H, 1, Dh) -> (B, D)
            h = h + torch.addmm(proj_b, y, proj_w)
            x = torch.layer_norm(h, (D,), ln2_w, ln2_b, eps)
            x = F.gelu(torch.addmm(fc_b, x, fc_w))
            h = h + torch.addmm(out_b, x, out_w)
        self.count += 1
        return torch.layer_norm(h, (D,), *self.ln_f)  # model.ln_f: (B, D)

    def type_logits(self, h: Tensor) -> Tensor:
        """(B, D) -> (B, V_type) (REMI: the token logits)."""
        return torch.addmm(self.type_head[0], h, self.type_head[1])

    def field_logits(self, h: Tensor, next_type: Tensor) -> Tensor:
        """CP: logits of fields 1..F-1 given each stream's drawn type (B,), side by side:
        (B, V_1 + ... + V_{F-1}); `.split(self.split, -1)` gives one (B, V_f) per field."""
        y = h @ self.type_h.T + self.type_e[next_type]  # type_proj(cat(h, emb(type)))
        return torch.addmm(self.heads_b, y, self.heads_w.T)
