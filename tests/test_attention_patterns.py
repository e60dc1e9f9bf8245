"""Attention patterns: the visible keys of every query against each pattern's definition (written out here again,
in plain Python), every backend against the SDPA boolean-mask oracle (outputs and gradients), weights that stay
dense attention's, exports, the MAE encoder's refusal, FLOPs with density, and `vit fit` of the windowed recipe."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import pytest
import torch

import vit.layers.attention_core.tiles as tiles
from vit.cli import main as vit_main
from vit.export import export_model, load_backbone
from vit.flops import attention_densities, count_flops, mae_forward_flops, vit_forward_flops
from vit.layers import (
    Attention,
    Pattern,
    attention_schedule,
    density,
    parse_pattern,
    pattern_mask,
    use_backend,
    visible_counts,
)
from vit.layers.attention_core import attend, attention_weights
from vit.layers.attention_core.cache import clear_cache
from vit.layers.attention_core.oracle import mask_attention
from vit.models import MaskedAutoencoder, VisionTransformer
from vit.train import attention_maps

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "supervised" / "vit_tiny_digits64_window.yaml"
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32: backends sum in different orders (observed differences below 3e-6)
# (pattern, grid): square, non-square, grids the window does not divide, grids smaller than the window
CASES = [("window:4", (8, 8)), ("window:4", (7, 10)), ("window:4:shift", (8, 8)), ("window:3:shift", (7, 10)),
         ("window:16", (5, 6)), ("neighborhood:3", (6, 7)), ("neighborhood:5:2", (9, 11)), ("neighborhood:7", (4, 9)),
         ("sliding:5", (6, 7)), ("strided:4", (6, 7)), ("strided:5", (7, 7)), ("kvpool:2", (5, 7)),
         ("kvpool:3", (6, 6))]
BACKEND = {"window": "window", "neighborhood": "tiles", "sliding": "tiles", "strided": "strided", "kvpool": "kvpool"}


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles far smaller than the grids, so every tiled case has many tiles, partial ones and clamped halos."""
    monkeypatch.setattr(tiles, "NEIGHBORHOOD_TILE", 2)
    monkeypatch.setattr(tiles, "SLIDING_TILE", 3)
    clear_cache()
    yield
    clear_cache()


def _block_pattern(spec: str) -> Pattern:
    """The pattern a block uses: the shifted variant for ``:shift`` (block 1 of a schedule)."""
    return attention_schedule(spec, 2)[1]


# ----------------------------------------------------------------------------------------------- the vocabulary
def test_grammar_and_schedules() -> None:
    assert parse_pattern("window:8") == Pattern("window", 8)
    assert parse_pattern("neighborhood:7:2") == Pattern("neighborhood", 7, dilation=2)
    assert [str(p) for p in attention_schedule("window:4:shift*3,dense", 8)] == [
        "window:4", "window:4:shift", "window:4", "dense", "window:4", "window:4:shift", "window:4", "dense"]
    assert attention_schedule(["kvpool:2", "dense"], 3) == attention_schedule("kvpool:2,dense", 3)
    assert [str(p) for p in attention_schedule("sliding:3", 2)] == ["sliding:3", "sliding:3"]
    assert attention_schedule(None, 1) == [Pattern()]


@pytest.mark.parametrize(("spec", "message"), [
    ("windows:8", "unknown attention pattern 'windows:8'"), ("window", "expected window:W or window:W:shift"),
    ("window:0", "positive integer"), ("window:8:roll", "expected window:W"), ("neighborhood:4", "must be odd"),
    ("dense:2", "dense takes no arguments"), ("kvpool:2:2", "expected kvpool:S"), ("window:1:shift", "W >= 2"),
])
def test_bad_spellings_say_what_is_expected(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_pattern(spec)


def test_schedule_errors() -> None:
    with pytest.raises(ValueError, match="has 3 entries for 2 blocks"):
        attention_schedule("dense,dense,window:2", 2)
    with pytest.raises(ValueError, match="repeat needs a positive integer"):
        attention_schedule("window:4*x", 4)


# ------------------------------------------------------------------------------------ masks against definitions
def _reference(spec: str, grid: tuple[int, int], P: int) -> torch.Tensor:
    """Each pattern's visible keys per query, from its definition in words, with Python lists and loops."""
    p, (h, w) = _block_pattern(spec), grid
    N = h * w
    mask = torch.zeros(P + N, P + N, dtype=torch.bool)
    mask[:P, :], mask[:, :P] = True, True  # class and register tokens are global
    for i, j in itertools.product(range(N), range(N)):
        (ri, ci), (rj, cj) = divmod(i, w), divmod(j, w)
        if p.kind == "window":  # cells bounded at shift + k·W (or k·W), partial at the borders
            same = all(_cell(a, n, p.size, p.shift) == _cell(b, n, p.size, p.shift)
                       for a, b, n in ((ri, rj, h), (ci, cj, w)))
        elif p.kind == "neighborhood":
            same = rj in _natten_window(ri, h, p.size, p.dilation) and cj in _natten_window(ci, w, p.size, p.dilation)
        elif p.kind == "sliding":
            same = abs(i - j) <= p.size
        elif p.kind == "strided":
            same = abs(i - j) < p.size or (i - j) % p.size == 0
        mask[P + i, P + j] = same
    return mask


def _cell(x: int, n: int, W: int, shift: int) -> int:
    edges = sorted({0, n, *range(shift or W, n, W)})
    return next(k for k in range(len(edges) - 1) if edges[k] <= x < edges[k + 1])


def _natten_window(x: int, n: int, K: int, D: int) -> list[int]:
    """The K positions of x's dilation group around x, the window slid back inside the axis (whole if shorter)."""
    group = [y for y in range(n) if y % D == x % D]
    k = min(K, len(group))
    start = min(max(group.index(x) - K // 2, 0), len(group) - k)
    return group[start : start + k]


@pytest.mark.parametrize("P", [0, 2])
@pytest.mark.parametrize(("spec", "grid"), [c for c in CASES if not c[0].startswith("kvpool")])
def test_mask_is_the_definition(spec: str, grid: tuple[int, int], P: int) -> None:
    p = _block_pattern(spec)
    ref = _reference(spec, grid, P)
    assert torch.equal(pattern_mask(p, grid, P), ref)
    assert torch.equal(visible_counts(p, grid, P), ref.sum(dim=1))  # the closed forms the FLOPs use
    assert density(p, grid, P) == pytest.approx(ref.sum().item() / ref.numel(), rel=1e-12)


def test_borders_and_shifts_by_hand() -> None:
    def keys(spec: str, grid: tuple[int, int], r: int, c: int) -> set[tuple[int, int]]:
        row = pattern_mask(_block_pattern(spec), grid, 0)[r * grid[1] + c]
        return {divmod(j, grid[1]) for j in row.nonzero().flatten().tolist()}

    box = lambda rows, cols: set(itertools.product(rows, cols))  # noqa: E731
    # clamped at the corners: still K×K keys, as NATTEN
    assert keys("neighborhood:3", (4, 5), 0, 0) == box(range(3), range(3))
    assert keys("neighborhood:3", (4, 5), 3, 4) == box(range(1, 4), range(2, 5))
    assert keys("neighborhood:3:2", (6, 6), 0, 0) == box((0, 2, 4), (0, 2, 4))
    assert keys("neighborhood:3:2", (6, 6), 5, 5) == box((1, 3, 5), (1, 3, 5))
    assert keys("neighborhood:5", (3, 9), 1, 8) == box(range(3), range(4, 9))  # 3 rows < K: all of them
    # shifted by W//2 = 2: cells [0, 2), [2, 6), [6, 8) on each axis
    assert keys("window:4:shift", (8, 8), 0, 0) == box(range(2), range(2))
    assert keys("window:4:shift", (8, 8), 3, 7) == box(range(2, 6), range(6, 8))
    assert keys("window:4", (8, 8), 3, 7) == box(range(4), range(4, 8))
    assert keys("window:3", (4, 5), 3, 4) == box((3,), (3, 4))  # the partial border cell of a 4x5 grid


def test_kvpool_pools_partial_cells_over_their_patches() -> None:
    from vit.layers.pattern_masks import kvpool_mask, pool_matrix

    pool = pool_matrix((3, 5), 2)  # cells of 2x2, 2x1, 1x2, 1x1 patches
    assert pool.shape == (6, 15)
    torch.testing.assert_close(pool.sum(dim=1), torch.ones(6))
    assert pool[0].nonzero().flatten().tolist() == [0, 1, 5, 6] and pool[2].nonzero().flatten().tolist() == [4, 9]
    assert pool[5].nonzero().flatten().tolist() == [14]
    mask = kvpool_mask((3, 5), 1, 2)  # keys: 1 prefix, 15 patches, 6 pooled cells
    assert mask[0, :16].all() and not mask[0, 16:].any()  # the class token sees every patch
    assert mask[1:, 0].all() and not mask[1:, 1:16].any() and mask[1:, 16:].all()
    assert torch.equal(visible_counts(parse_pattern("kvpool:2"), (3, 5), 1), mask.sum(dim=1))


# --------------------------------------------------------------------------------------- backends ≡ the oracle
def _qkv(T: int) -> list[torch.Tensor]:
    return [torch.randn(2, 3, T, 8, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("P", [0, 2])
@pytest.mark.parametrize(("spec", "grid"), CASES)
def test_backend_equals_the_oracle_in_outputs_and_gradients(spec: str, grid: tuple[int, int], P: int) -> None:
    p = _block_pattern(spec)
    q, k, v = _qkv(P + grid[0] * grid[1])
    ref = mask_attention(q, k, v, p, grid, P)
    out = attend(q, k, v, p, grid, backend=BACKEND[p.kind])
    g = torch.randn_like(ref)
    torch.testing.assert_close(out, ref, **TOL)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g), strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert attend(q, k, v, p, grid).shape == ref.shape  # the automatic choice runs too


def test_the_oracle_itself_is_masked_attention() -> None:
    p, grid, P = _block_pattern("window:3:shift"), (7, 10), 1
    q, k, v = (t.detach() for t in _qkv(P + 70))
    scores = (q @ k.transpose(-2, -1)) * 8**-0.5
    ref = scores.masked_fill(~_reference("window:3:shift", grid, P), float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(mask_attention(q, k, v, p, grid, P), ref, **TOL)


@pytest.mark.slow
def test_flex_attention_forward_equals_the_oracle_on_cpu() -> None:
    # one pattern: each compiles its own kernel (~20 s on 2 cores); the dilated, clamped one has the most to get wrong
    spec, grid, P = "neighborhood:5:2", (9, 11), 1
    p = _block_pattern(spec)
    q, k, v = (t.detach() for t in _qkv(P + grid[0] * grid[1]))
    with torch.no_grad():  # torch compiles flex attention on the CPU for the forward only
        torch.testing.assert_close(attend(q, k, v, p, grid, backend="flex"), mask_attention(q, k, v, p, grid, P),
                                   **TOL)


def test_flex_refuses_what_it_cannot_do_on_cpu() -> None:
    p = _block_pattern("neighborhood:3")
    q, k, v = _qkv(1 + 36)
    with pytest.raises(ValueError, match="forward only"):
        attend(q, k, v, p, (6, 6), backend="flex")
    with pytest.raises(ValueError, match="no attention dropout"):
        attend(q, k, v, p, (6, 6), dropout_p=0.1, backend="flex")
    with pytest.raises(ValueError, match="cannot compute pattern kvpool:2"), use_backend("tiles"):
        attend(q, k, v, parse_pattern("kvpool:2"), (6, 6))


@pytest.mark.parametrize(("spec", "grid"), [CASES[3], CASES[6], CASES[9], CASES[12]])
def test_attention_weights_reproduce_the_output(spec: str, grid: tuple[int, int]) -> None:
    p, P = _block_pattern(spec), 1
    q, k, v = (t.detach() for t in _qkv(P + grid[0] * grid[1]))
    weights = attention_weights(q, k, p, grid, 8**-0.5)
    torch.testing.assert_close(weights @ v, mask_attention(q, k, v, p, grid, P), **TOL)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]), **TOL)
    if p.kind != "kvpool":
        assert (weights[..., ~pattern_mask(p, grid, P)] == 0).all()  # unseen keys weigh nothing


@pytest.mark.parametrize("spec", ["window:3:shift", "neighborhood:3", "kvpool:2", "strided:4"])
def test_module_paths_agree_and_need_the_grid(spec: str) -> None:
    attn = Attention(32, num_heads=4, pattern=_block_pattern(spec)).eval()
    x = torch.randn(2, 1 + 42, 32)
    fused = attn(x, grid=(6, 7))
    attn.fused_attn = False
    torch.testing.assert_close(attn(x, grid=(6, 7)), fused, **TOL)  # the manual path: explicit masked softmax
    with pytest.raises(ValueError, match="needs the patch grid"):
        attn(x)
    with pytest.raises(ValueError, match="43 tokens cannot hold a 7x7 patch grid"):
        attn(x, grid=(7, 7))
    with pytest.raises(ValueError, match="defined for self-attention"):
        attn(x[:, :1], context=x)


def test_training_with_attention_dropout_runs_every_backend() -> None:
    for spec in ("window:3:shift", "neighborhood:3", "strided:4", "kvpool:2"):
        attn = Attention(32, num_heads=4, attn_drop=0.5, pattern=_block_pattern(spec)).train()
        x = torch.randn(2, 43, 32, requires_grad=True)
        attn(x, grid=(6, 7)).sum().backward()
        assert torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------------ in the models
TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=5)


@pytest.mark.parametrize("spec", ["window:8", "neighborhood:9", "sliding:64", "strided:1", "kvpool:1"])
def test_a_pattern_that_sees_everything_is_dense(spec: str) -> None:
    dense = VisionTransformer(**TINY, reg_tokens=1).eval()
    model = VisionTransformer(**TINY, reg_tokens=1, attention=spec).eval()
    model.load_state_dict(dense.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for backend in ("auto", BACKEND[parse_pattern(spec).kind]):  # 66 tokens: auto is the mask, then the fast path
        with use_backend(backend):
            torch.testing.assert_close(model(x), dense(x), **TOL)


def test_auto_backend_follows_device_and_size() -> None:
    from vit.layers.attention_core import SMALL, choose_backend

    small, large = torch.empty(1, 1, SMALL - 1, 1), torch.empty(1, 1, SMALL, 1)
    assert [choose_backend(_block_pattern(s), large) for s in ("window:4", "neighborhood:3", "sliding:4",
                                                                "strided:4", "kvpool:2", "dense")] == [
        "window", "tiles", "tiles", "strided", "kvpool", "sdpa"]
    assert [choose_backend(_block_pattern(s), small) for s in ("window:4", "strided:4", "kvpool:2")] == [
        "mask", "mask", "kvpool"]
    with pytest.raises(ValueError, match="cannot compute pattern window:4"):
        choose_backend(_block_pattern("window:4"), large, backend="sdpa")


def test_dense_weights_load_strictly_into_pattern_models_and_back() -> None:
    dense = VisionTransformer(**TINY)
    x = torch.randn(1, 3, 32, 32)
    for spec in ("window:4:shift*1,dense", "neighborhood:3:2", "sliding:5", "strided:4", "kvpool:2"):
        model = VisionTransformer(**TINY, attention=spec)
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        assert shapes == {k: v.shape for k, v in dense.state_dict().items()}
        model.load_state_dict(dense.state_dict(), strict=True)
        back = VisionTransformer(**TINY)
        back.load_state_dict(model.state_dict(), strict=True)
        with torch.no_grad():
            assert torch.equal(back.eval()(x), dense.eval()(x))
            assert not torch.allclose(model.eval()(x), dense(x))  # the pattern changes the function, not the weights


def test_schedule_is_recorded_and_rebuilt_from_an_export(tmp_path: Path) -> None:
    model = VisionTransformer(**{**TINY, "depth": 4}, attention="window:4:shift*3,dense").eval()
    assert [str(b.attn.pattern) for b in model.blocks] == ["window:4", "window:4:shift", "window:4", "dense"]
    assert model.model_args["attention"] == "window:4:shift*3,dense"
    export_model(model, "safetensors", tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_args"]["attention"] == "window:4:shift*3,dense"
    loaded = load_backbone(tmp_path)
    assert [b.attn.pattern for b in loaded.blocks] == [b.attn.pattern for b in model.blocks]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(x), model.forward_features(x), **TOL)


def test_patterns_follow_the_real_grid_of_other_image_sizes() -> None:
    model = VisionTransformer(**TINY, attention="window:3:shift*1,neighborhood:3", dynamic_img_size=True).eval()
    x = torch.randn(1, 3, 24, 44)  # a 6x11 grid
    feats = model.forward_features(x)
    with use_backend("mask"):
        torch.testing.assert_close(model.forward_features(x), feats, **TOL)
    assert model.get_intermediate_layers(x, 1, reshape=True)[0].shape == (1, 32, 6, 11)


def test_torch_export_of_a_windowed_model_reruns_like_any_export(tmp_path: Path) -> None:
    model = VisionTransformer(**{**TINY, "img_size": (32, 48), "depth": 3}, attention="window:3:shift*2,dense").eval()
    with use_backend("window"):  # the restructured path (96 tokens would take the mask)
        report = export_model(model, "torch-export", tmp_path)
    assert report.checks and all(c.ok for c in report.checks)


@pytest.mark.onnx
def test_onnx_export_of_a_windowed_model_reruns_like_any_export(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model = VisionTransformer(**{**TINY, "img_size": (32, 48), "depth": 3}, attention="window:3:shift*2,dense").eval()
    with use_backend("window"):
        report = export_model(model, "onnx", tmp_path)
    assert report.checks and all(c.ok and c.max_abs_diff < 1e-4 for c in report.checks)


def test_attention_maps_of_a_pattern_model() -> None:
    model = VisionTransformer(**{**TINY, "num_classes": 3}, attention="window:4").eval()
    maps = attention_maps(model, torch.randn(2, 3, 32, 32))
    assert maps["last"].shape == maps["rollout"].shape == (2, 8, 8)
    assert (maps["last"].sum(dim=(1, 2)) <= 1 + 1e-5).all()
    avg = VisionTransformer(**{**TINY, "num_classes": 3}, global_pool="avg", attention="window:4").eval()
    last = attention_maps(avg, torch.randn(1, 3, 32, 32))["last"][0]
    assert (last > 0).all()  # the mean over patch rows: every window's rows put weight on their own window


def test_mae_decoder_patterns_and_the_encoder_refusal() -> None:
    kw = dict(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
              decoder_depth=2, decoder_num_heads=2)
    mae = MaskedAutoencoder(**kw, decoder_attention="window:4:shift")
    loss, pred, mask = mae(torch.randn(2, 3, 32, 32), 0.75)
    loss.backward()
    assert torch.isfinite(loss) and pred.shape == (2, 64, 48)
    assert [str(b.attn.pattern) for b in mae.decoder_blocks] == ["window:4", "window:4:shift"]
    windowed = MaskedAutoencoder(**kw, attention="window:4")
    with pytest.raises(ValueError, match=r"attention='window:4' cannot run in the encoder at mask_ratio=0\.75"):
        windowed(torch.randn(1, 3, 32, 32), 0.75)
    windowed.load_state_dict(mae.state_dict())
    imgs = torch.randn(1, 3, 32, 32)
    latent, _, _ = windowed.forward_encoder(imgs, 0.0)  # the whole grid, in raster order: the pattern is defined
    enc = windowed.encoder
    tokens = enc._pos_embed(enc.patch_embed(imgs), enc.grid_size)
    for blk in enc.blocks:
        tokens = blk(tokens, enc.grid_size)
    torch.testing.assert_close(latent, enc.norm(tokens), **TOL)


# --------------------------------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("spec", ["window:4:shift", "neighborhood:3", "sliding:5", "strided:4", "kvpool:2",
                                  "window:4*1,dense"])
def test_flops_count_the_core_as_density_times_dense(spec: str) -> None:
    dense, model = VisionTransformer(**TINY).eval(), VisionTransformer(**TINY, attention=spec).eval()
    x = torch.randn(1, 3, 32, 32)
    counted = count_flops(lambda: model(x))
    assert counted == vit_forward_flops(model)
    T, D = 65, 32
    core = 2 * T * T * D * 2  # scores and weighted sum of one dense block
    rho = [r for _, r in attention_densities(model)]
    assert counted == count_flops(lambda: dense(x)) - sum(round((1 - r) * core) for r in rho)
    assert rho == [density(b.attn.pattern, (8, 8), 1) for b in model.blocks] and min(rho) < 1
    # a training step: the backward counts twice the forward, the counter sees the stand-in's backward too
    patch = 2 * 64 * 3 * 16 * 32
    assert count_flops(lambda: model(x).sum().backward()) == 3 * counted - patch


def test_mae_flops_with_a_decoder_pattern() -> None:
    mae = MaskedAutoencoder(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                            decoder_depth=2, decoder_num_heads=2, decoder_attention="window:4")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert count_flops(lambda: mae(x, 0.75)) == mae_forward_flops(mae, 0.75)


def test_plan_prints_the_density(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert vit_main(["plan", "--config", str(RECIPE), "--images", "100", "--classes", "10"]) in (0, None)
    out = capsys.readouterr().out
    assert "window:4 x2 (density 0.070), window:4:shift x1 (density 0.055), dense x1" in out


# ---------------------------------------------------------------------------------------------- the recipe
@pytest.mark.slow
def test_vit_fit_of_the_windowed_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    net = {"patch_size": 4, "embed_dim": 32, "depth": 4, "num_heads": 2, "attention": "window:4:shift*3,dense"}
    with caplog.at_level(logging.INFO):
        vit_main(["fit", "--config", str(RECIPE), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
                  "--trainer.limit_val_batches", "1", "--data.batch_size", "8",
                  "--model.init_args.model_kwargs", json.dumps(net)])
    ckpt = torch.load(tmp_path / "runs" / "window_tiny_digits64" / "checkpoints" / "last.ckpt", weights_only=True,
                      map_location="cpu")
    assert ckpt["global_step"] == 3
    assert ckpt["vit_network"]["model_args"]["attention"] == "window:4:shift*3,dense"
    assert ckpt["vit_network"]["model_args"]["img_size"] in (64, [64, 64], (64, 64))
