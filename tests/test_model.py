"""The CP/REMI Transformer: shapes, causality, cache equivalences, the skew, type-first heads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from musegen.config import ParamsError, load_section
from musegen.core.model import (
    Decoder,
    KVCache,
    ModelConfig,
    ModelParams,
    MusicTransformer,
    relative_logits,
)

ROOT = Path(__file__).resolve().parents[1]
CP_FIELDS = ("type", "bar_beat", "tempo", "chord", "pitch", "duration", "velocity", "rest")
CP_SIZES = (4, 18, 11, 20, 30, 12, 9, 5)  # small, all different so a mixed-up field shows
ATTENTION = ("relative", "absolute")


def tiny(attention: str = "relative", n_fields: int = 8, **kw: object) -> ModelConfig:
    """A model small enough for many forwards per test (max_len 8 so clipping is exercised)."""
    sizes = CP_SIZES if n_fields == 8 else (40,)
    base = {
        "vocab_sizes": sizes,
        "emb_sizes": tuple(4 + 2 * i for i in range(n_fields)),
        "d_model": 32,
        "n_layer": 2,
        "n_head": 4,
        "d_ff": 64,
        "dropout": 0.0,
        "max_len": 8,
        "attention": attention,
    }
    return ModelConfig(**{**base, **kw})


def build(config: ModelConfig, seed: int = 0) -> MusicTransformer:
    torch.manual_seed(seed)
    return MusicTransformer(config).eval()


def random_ids(config: ModelConfig, b: int, t: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randint(0, v, (b, t, 1), generator=g) for v in config.vocab_sizes]
    return torch.cat(cols, dim=-1)  # (B, T, F)


def next_types(x: torch.Tensor) -> torch.Tensor:
    """Teacher forcing: the type of the following word (last one repeats)."""
    return torch.cat([x[:, 1:, 0], x[:, -1:, 0]], dim=1)  # (B, T)


@pytest.mark.parametrize("attention", ATTENTION)
def test_shapes_cp_and_remi(attention: str) -> None:
    cp = tiny(attention)
    out = build(cp)(random_ids(cp, 2, 5), next_types(random_ids(cp, 2, 5)))
    assert [tuple(o.shape) for o in out] == [(2, 5, v) for v in CP_SIZES]
    remi = tiny(attention, n_fields=1)
    model = build(remi)
    (logits,) = model(random_ids(remi, 3, 7))
    assert logits.shape == (3, 7, 40)
    h, cache = model.hidden(random_ids(remi, 3, 7))
    assert h.shape == (3, 7, 32) and len(cache) == 7 and cache.pos == 7
    assert cache.keys[0].shape == (3, 4, 7, 8)  # (B, H, T, Dh)


def test_forward_equals_hidden_then_heads_and_type_only_call() -> None:
    config = tiny()
    model = build(config)
    x = random_ids(config, 2, 6)
    nt = next_types(x)
    full = model(x, nt)
    h, _ = model.hidden(x)
    for a, b in zip(full, model.head_logits(h, nt), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    (type_only,) = model.head_logits(h)  # the sampler's first call: type logits only
    torch.testing.assert_close(type_only, full[0], rtol=0, atol=0)


@pytest.mark.parametrize("attention", ATTENTION)
def test_causal_future_never_changes_past(attention: str) -> None:
    config = tiny(attention)
    model = build(config)
    x = random_ids(config, 2, 12)  # longer than max_len: clipped distances too
    nt = next_types(x)
    t = 6
    x2, nt2 = x.clone(), nt.clone()
    x2[:, t + 1 :] = random_ids(config, 2, 12 - t - 1, seed=9)
    nt2[:, t + 1 :] = (nt[:, t + 1 :] + 1) % CP_SIZES[0]
    before, after = model(x, nt), model(x2, nt2)
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])  # the change did reach later


@pytest.mark.parametrize("attention", ATTENTION)
def test_incremental_with_cache_equals_full_forward(attention: str) -> None:
    config = tiny(attention)
    model = build(config)
    x = random_ids(config, 2, 14)  # 14 > max_len 8: the cache outgrows the distance table
    nt = next_types(x)
    full = model(x, nt)
    # a 5-word prompt at once, then one word at a time
    h, cache = model.hidden(x[:, :5])
    steps = [h]
    for t in range(5, 14):
        h, cache = model.hidden(x[:, t : t + 1], cache)
        steps.append(h)
    assert len(cache) == 14 and cache.pos == 14
    inc = model.head_logits(torch.cat(steps, dim=1), nt)
    for a, b in zip(full, inc, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attention", ATTENTION)
def test_sliding_window_trim_equals_local_attention(attention: str) -> None:
    """Trim to W-1 before each word == a full forward whose attention spans W positions."""
    config = tiny(attention, n_layer=3)
    model = build(config)
    W, T = config.max_len, 20
    x = random_ids(config, 2, T)
    full_local, _ = model.hidden(x, window=W)
    full_global, _ = model.hidden(x)
    cache, steps = None, []
    for t in range(T):
        cache = cache.trim(W - 1) if cache is not None else None
        h, cache = model.hidden(x[:, t : t + 1], cache)
        assert len(cache) == min(t + 1, W) and cache.pos == t + 1
        steps.append(h)
    inc = torch.cat(steps, dim=1)
    torch.testing.assert_close(inc, full_local, rtol=0, atol=1e-5)
    assert not torch.allclose(inc[:, W:], full_global[:, W:])  # the window did cut something


def test_sliding_window_one_layer_equals_forward_over_window() -> None:
    """With one layer the kept keys depend only on their own words: trim == fresh window."""
    config = tiny(n_layer=1)
    model = build(config)
    W = config.max_len
    x = random_ids(config, 1, 18)
    _, cache = model.hidden(x[:, :12])  # a cache longer than max_len
    h, _ = model.hidden(x[:, 12:13], cache.trim(W - 1))
    h_window, _ = model.hidden(x[:, 13 - W : 13])
    torch.testing.assert_close(h[:, 0], h_window[:, -1], rtol=0, atol=1e-5)


def test_trim_keeps_newest_positions() -> None:
    keys = [torch.arange(5.0).view(1, 1, 5, 1)]
    cache = KVCache(keys, [k + 10 for k in keys], pos=5)
    kept = cache.trim(2)
    assert kept.keys[0].flatten().tolist() == [3.0, 4.0]
    assert kept.values[0].flatten().tolist() == [13.0, 14.0] and kept.pos == 5
    assert len(cache.trim(0)) == 0 and len(cache.trim(9)) == 5 and len(cache) == 5
    with pytest.raises(ValueError, match="n must be >= 0"):
        cache.trim(-1)


@pytest.mark.parametrize(("t_q", "t_k", "max_len"), [(6, 6, 8), (6, 6, 3), (3, 10, 4), (1, 9, 9)])
def test_skew_equals_naive_gather(t_q: int, t_k: int, max_len: int) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, t_q, 5, generator=g, dtype=torch.float64)  # (B, H, Tq, Dh)
    rel = torch.randn(max_len, 5, generator=g, dtype=torch.float64)  # one row per distance
    skewed = relative_logits(q, rel, t_k)
    # naive: S[i, j] = q_i · rel[min(dist, max_len - 1)], dist = key index of query i - j
    for i in range(t_q):
        for j in range(t_k - t_q + i + 1):  # causal entries only (the rest are masked)
            d = min(t_k - t_q + i - j, max_len - 1)
            naive = (q[:, :, i] * rel[d]).sum(-1)  # (B, H)
            torch.testing.assert_close(skewed[:, :, i, j], naive, rtol=0, atol=1e-12)


def test_type_first_heads_see_next_type() -> None:
    config = tiny()
    model = build(config)
    x = random_ids(config, 2, 6)
    nt = next_types(x)
    a, b = model(x, nt), model(x, (nt + 1) % CP_SIZES[0])
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)  # type head reads h only
    for f in range(1, 8):
        assert not torch.allclose(a[f], b[f]), f"field {f} ignores next_type"


@pytest.mark.parametrize(
    ("attention", "n_fields"), [("relative", 8), ("absolute", 8), ("relative", 1)]
)
def test_gradients_reach_every_parameter(attention: str, n_fields: int) -> None:
    config = tiny(attention, n_fields=n_fields, dropout=0.1)
    model = build(config).train()
    x = random_ids(config, 2, 10)  # T > max_len so every relative distance is used
    nt = next_types(x) if n_fields > 1 else None
    logits = model(x, nt)
    target = random_ids(config, 2, 10, seed=5)
    loss = sum(
        F.cross_entropy(lg.flatten(0, 1), target[..., f].flatten()) for f, lg in enumerate(logits)
    )
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_deterministic_with_fixed_seed() -> None:
    config = tiny(dropout=0.1)
    x = random_ids(config, 2, 6)
    outs = []
    for _ in range(2):
        model = build(config, seed=3).train()
        torch.manual_seed(4)  # dropout masks
        outs.append(model(x, next_types(x)))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = build(config, seed=5)
    assert not torch.equal(other.heads[0].weight, build(config, seed=3).heads[0].weight)


def test_clear_errors() -> None:
    config = tiny()
    model = build(config)
    x = random_ids(config, 2, 4)
    with pytest.raises(ValueError, match=r"shape \(B, T, 8\)"):
        model(x[..., 0], next_types(x))
    with pytest.raises(ValueError, match=r"next_type .* is required"):
        model(x)
    with pytest.raises(ValueError, match=r"expected shape \(2, 4\)"):
        model(x, next_types(x)[:, :3])
    bad = x.clone()
    bad[0, 1, 4] = CP_SIZES[4]  # pitch id == vocab size
    with pytest.raises(ValueError, match=r"field 4 ids must lie in \[0, 30\)"):
        model(bad, next_types(x))
    with pytest.raises(ValueError, match="next_type: field 0"):
        model(x, next_types(x) + CP_SIZES[0])
    with pytest.raises(ValueError, match="multiple of 2 \\* n_head"):
        tiny(d_model=30)
    with pytest.raises(ValueError, match="attention 'rotary'"):
        tiny(attention="rotary")
    remi = build(tiny(n_fields=1))
    with pytest.raises(ValueError, match="only for CP"):
        remi.head_logits(torch.zeros(1, 2, 32), torch.zeros(1, 2, dtype=torch.long))


def test_from_params_uses_params_yaml_and_names_missing_field() -> None:
    params = load_section(ModelParams, "model", ROOT / "params.yaml")
    cp = ModelConfig.from_params(params, {"fields": list(CP_FIELDS), "sizes": list(CP_SIZES)})
    assert cp.vocab_sizes == CP_SIZES
    assert cp.emb_sizes == tuple(params.emb_sizes[f] for f in CP_FIELDS)
    assert (cp.d_model, cp.max_len, cp.attention) == (
        params.d_model,
        params.max_len,
        params.attention,
    )
    remi = ModelConfig.from_params(params, {"fields": ["token"], "sizes": {"token": 300}})
    assert remi.vocab_sizes == (300,) and remi.emb_sizes == (params.emb_sizes["token"],)
    assert MusicTransformer(remi).n_fields == 1
    with pytest.raises(ParamsError, match="no entry for field 'chords'"):
        ModelConfig.from_params(params, {"fields": ["type", "chords"], "sizes": [4, 9]})
    # a checkpoint stores asdict(config); lists come back and rebuild the same config
    stored = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cp).items()}
    assert ModelConfig(**stored) == cp


@pytest.mark.parametrize("attention", ATTENTION)
def test_flops_per_token_matches_flop_counter(attention: str) -> None:
    config = tiny(attention)
    model = build(config)
    x = random_ids(config, 2, 8)
    # the math backend decomposes attention into matmuls the counter sees (it has no formula
    # for the fused CPU kernel)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, next_types(x))
    assert model.flops_per_token(8) == counter.get_total_flops() / (2 * 8)
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.flops_per_token() == model.flops_per_token(config.max_len)


@pytest.mark.parametrize("attention", ATTENTION)
def test_autocast_bfloat16_full_and_cached(attention: str) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = tiny(attention)
    model = build(config).to(device)
    x = random_ids(config, 2, 10).to(device)
    nt = next_types(x)
    with torch.autocast(device, dtype=torch.bfloat16):
        full = model(x, nt)
        h, cache = model.hidden(x[:, :9])
        step = model.head_logits(model.hidden(x[:, 9:], cache)[0], nt[:, 9:])
        h1, cache = model.hidden(x[:, 9:], cache.trim(config.max_len - 1))  # sliding window
    assert all(torch.isfinite(o).all() for o in [*full, *step, h1])
    assert cache.keys[0].dtype == torch.bfloat16 and h.dtype == torch.float32
    torch.testing.assert_close(step[0].float(), full[0][:, 9:].float(), rtol=0, atol=0.1)


# ---- relative attention paths: each equals the skew reference -----------------------------
PATHS = ("gather", "flex")


def path_outputs(model: MusicTransformer, impl: str, x: torch.Tensor) -> list[torch.Tensor]:
    """Hidden states of a full pass, a windowed pass, and a prompt + chunk through the cache."""
    model.set_attention_impl(impl)
    full, _ = model.hidden(x)
    local, _ = model.hidden(x, window=5)
    _, cache = model.hidden(x[:, :7])
    chunk, _ = model.hidden(x[:, 7:11], cache, window=model.config.max_len)
    step, _ = model.hidden(x[:, 11:12], cache)
    return [full, local, chunk, step]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
@pytest.mark.parametrize("impl", PATHS)
def test_attention_paths_equal_skew_forward(impl: str, per_head: bool) -> None:
    """Forward on CPU, within 1e-5 (float32); T = 14 > max_len = 8 clips distances too."""
    config = tiny(rel_per_head=per_head)
    model = build(config)
    x = random_ids(config, 2, 14)
    with torch.no_grad():
        reference = path_outputs(model, "skew", x)
        for got, ref in zip(path_outputs(model, impl, x), reference, strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU paths untested")
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
@pytest.mark.parametrize("impl", PATHS)
def test_attention_paths_equal_skew_forward_and_gradients_cuda(impl: str, per_head: bool) -> None:
    """On CUDA (float32, Dh = 16 for the Triton kernels): outputs and every gradient."""
    config = tiny(rel_per_head=per_head, d_model=64, max_len=64)
    x = random_ids(config, 2, 96).cuda()  # 96 > max_len: clipped distances
    grads = {}
    for name in ("skew", impl):
        model = build(config).cuda().train().set_attention_impl(name)
        h, _ = model.hidden(x, window=80)
        h.square().mean().backward()
        grads[name] = (h.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(grads[impl][0], grads["skew"][0], rtol=1e-4, atol=1e-4)
    for n, g in grads["skew"][1].items():
        torch.testing.assert_close(grads[impl][1][n], g, rtol=1e-3, atol=1e-4, msg=n)


def test_per_head_relative_embeddings_and_cpu_training_path() -> None:
    shared, per_head = build(tiny()), build(tiny(rel_per_head=True))
    assert shared.blocks[0].attn.rel.shape == (8, 8)  # (max_len, Dh)
    assert per_head.blocks[0].attn.rel.shape == (4, 8, 8)  # (H, max_len, Dh)
    x = random_ids(tiny(), 2, 6)
    with torch.no_grad():
        ref = per_head.hidden(x)[0]
        per_head.blocks[0].attn.rel[1] += torch.randn(8, 8)  # one head's table only
        assert not torch.allclose(per_head.hidden(x)[0], ref)
    # on CPU "auto" trains through a path that has a backward (FlexAttention has none)
    assert per_head.blocks[0].attn.resolved_impl(torch.device("cpu")) == "skew"
    with pytest.raises(ValueError, match="attention impl 'fast'"):
        per_head.set_attention_impl("fast")


@pytest.mark.parametrize("starts", [[3, 19, 1], [2, 2, 2]])
@pytest.mark.parametrize(
    ("attention", "per_head"), [("relative", False), ("relative", True), ("absolute", False)]
)
def test_batched_ring_decoder_equals_windowed_forward(
    attention: str, per_head: bool, starts: list[int]
) -> None:
    """Decoder steps == hidden(window=max_len) per stream; prompts of different lengths (one
    longer than the window) or equal ones, a stream dropped halfway (keep), fused heads ==
    head_logits. 16 steps > max_len 8: the ring wraps and the unwritten-slot bias is skipped
    after W steps (transposed key ring, E_r read as a slice of its doubled flip, q pre-scaled
    and q · E_r added in one baddbmm; tolerance 1e-5, float32)."""
    config = tiny(attention, rel_per_head=per_head)
    model = build(config)
    x = random_ids(config, 3, 40)
    W = config.max_len
    with torch.no_grad():
        full = [model.hidden(x[i : i + 1], window=W)[0][0] for i in range(3)]  # (T, D) each
        dec = Decoder(model, 3)
        for i, n in enumerate(starts):
            torch.testing.assert_close(dec.prime(i, x[i, :n]), full[i][n - 1], rtol=0, atol=1e-5)
        rows = [0, 1, 2]
        for t in range(16):
            if t == 8:  # stream 1 ends: the batch shrinks to streams 0 and 2
                rows = [0, 2]
                dec.keep(torch.tensor(rows))
            words = torch.stack([x[i, starts[i] + t] for i in rows])  # (B, F)
            h = dec.step(words)
            for b, i in enumerate(rows):
                torch.testing.assert_close(h[b], full[i][starts[i] + t], rtol=0, atol=1e-5)
        nt = x[rows, 0, 0]  # any types
        ref = model.head_logits(h[:, None], nt[:, None])
        torch.testing.assert_close(dec.type_logits(h), ref[0][:, 0], rtol=0, atol=1e-5)
        for got, want in zip(dec.field_logits(h, nt).split(dec.split, -1), ref[1:], strict=True):
            torch.testing.assert_close(got, want[:, 0], rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="before the first step"):
            dec.prime(0, x[0, :2])
