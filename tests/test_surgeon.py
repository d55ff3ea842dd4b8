"""Layer-wise Optimal Brain Surgeon (obd_ext.layerwise.surgeon, method="layerwise-obs").

Against the unblocked textbook reference (obd_ext.reference.obs_prune) and
brute-force least squares on tiny layers, in float64.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import obd_ext
from obd_ext import reference
from obd_ext.layerwise import GramStats, obs_prune_, prunable_layers, prune_layerwise, weight_rows
from obd_ext.layerwise import surgeon
from obd_ext.models import GPT

f64 = torch.float64


def _layer(rows, cols, tokens=None, dead=(), seed=0, dtype=f64):
    """Weights, correlated inputs X [tokens, cols] (columns in ``dead`` all zero) and X^T X."""
    g = torch.Generator().manual_seed(seed)
    tokens = tokens or 4 * cols
    x = torch.randn(tokens, cols, generator=g, dtype=f64) @ torch.randn(cols, cols, generator=g, dtype=f64)
    x += 3 * torch.randn(tokens, 1, generator=g, dtype=f64)  # a shared component: strongly correlated inputs
    for j in dead:
        x[:, j] = 0
    w = torch.randn(rows, cols, generator=g, dtype=f64)
    return w.to(dtype), x, x.T @ x


CASES = [  # rows, cols, blocksize, pattern, scope, sparsity
    (5, 12, 4, "unstructured", "row", 0.5),
    (6, 13, 5, "unstructured", "layer", 0.4),  # cols not a multiple of the block
    (7, 10, 128, "unstructured", "row", 0.3),  # one block
    (4, 37, 16, "unstructured", "row", 0.7),
    (3, 37, 16, "unstructured", "layer", 0.55),
    (4, 16, 8, "2:4", "row", None),
    (3, 24, 8, "4:8", "row", None),
    (2, 20, 4, "2:4", "row", None),  # one group per block
]


def _sweep_equals_the_reference(w0, gram, sparsity, pattern, scope, bs):
    """obs_prune_ in float64 against reference.obs_prune: the same mask, weights and predicted increase."""
    w = w0.clone()
    res = obs_prune_(w, gram, sparsity=sparsity, pattern=pattern, scope=scope, blocksize=bs, dtype=f64)
    ref_w, ref_keep, ref_loss = reference.obs_prune(w0, gram, sparsity=sparsity, pattern=pattern, scope=scope,
                                                   blocksize=bs)
    assert torch.equal(res.mask, ref_keep)
    torch.testing.assert_close(w, ref_w, rtol=1e-9, atol=1e-9)
    assert res.predicted_increase == pytest.approx(ref_loss, rel=1e-9)
    return w, res


@pytest.mark.parametrize("rows, cols, bs, pattern, scope, sparsity", CASES, ids=str)
def test_blocked_sweep_equals_the_reference(rows, cols, bs, pattern, scope, sparsity):
    w0, x, gram = _layer(rows, cols, dead=(2,))
    w, res = _sweep_equals_the_reference(w0, gram, sparsity, pattern, scope, bs)
    assert res.dead_inputs == 1
    # deleted entries are exactly zero; the pattern is met exactly
    assert bool((w[~res.mask] == 0).all())
    if pattern == "unstructured" and scope == "row":
        assert ((~res.mask).sum(1) == round(sparsity * cols)).all()
    elif pattern == "unstructured":
        assert res.deleted == round(sparsity * rows * cols)
    else:
        obd_ext.check_nm_pattern(w, pattern, "w")
        n, m = (int(v) for v in pattern.split(":"))
        assert (res.mask.reshape(rows, -1, m).sum(-1) == n).all()
    # the predicted increase is the damped objective of the final weights, exactly
    d = w - w0
    live = gram.diagonal() > 0
    lam = 0.01 * float(2 * gram.diagonal()[live].mean())
    objective = float((x @ d.T).square().sum()) + lam / 2 * float(d[:, live].square().sum())
    assert res.predicted_increase == pytest.approx(objective, rel=1e-9)


SUB_BLOCK_CASES = [  # blocks wider than the CPU sub-block of 8 columns (forced below): the sub-block GEMM path
    (5, 40, 16, "unstructured", "row", 0.5),
    (4, 37, 20, "unstructured", "row", 0.7),  # sub-blocks of 8, 8, 4
    (3, 37, 16, "unstructured", "layer", 0.55),
    (4, 48, 16, "2:4", "row", None),
    (3, 48, 24, "4:8", "row", None),
]


@pytest.mark.parametrize("rows, cols, bs, pattern, scope, sparsity", SUB_BLOCK_CASES, ids=str)
def test_sub_blocked_sweep_equals_the_reference(monkeypatch, rows, cols, bs, pattern, scope, sparsity):
    monkeypatch.setattr(surgeon, "_TILE_ELEMENTS", 1)
    assert surgeon._sub_block(rows, bs, 4 if pattern == "2:4" else 8, torch.device("cpu")) == 8
    w0, _, gram = _layer(rows, cols, dead=(2, 9))
    _sweep_equals_the_reference(w0, gram, sparsity, pattern, scope, bs)


@pytest.mark.parametrize("k", [0, 1, 3, 6, 7])
def test_float32_lowest_marks_equal_a_stable_sort_with_ties(k):
    """The float32 integer-key selection against a stable sort, on scores full of ties (zeros, repeats)."""
    g = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 4, (7, 50), generator=g).float() * 0.37
    scores[:, :5] = 0
    scores[:, 5] = float("inf")
    scores[3, 6] = torch.finfo(torch.float32).tiny / 4  # a subnormal
    expected = torch.zeros(7, 50, dtype=torch.bool).scatter_(0, torch.sort(scores, dim=0, stable=True).indices[:k],
                                                             True)
    for dtype in (torch.float32, torch.float64):
        out = torch.empty(7, 50, dtype=torch.bool)
        if k:
            surgeon._mark_lowest_(scores.to(dtype), k, out, torch.arange(7)[:, None])
            assert torch.equal(out, expected), dtype


@pytest.mark.parametrize("pattern, scope", [("unstructured", "row"), ("2:4", "row"), ("unstructured", "layer")])
def test_float32_sweep_follows_the_reference(monkeypatch, pattern, scope):
    """float32 (the integer-key selection, sub-blocks) on a well-conditioned layer: the reference's mask, its
    weights to float32 rounding."""
    monkeypatch.setattr(surgeon, "_TILE_ELEMENTS", 1)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(400, 48, generator=g, dtype=f64)
    x[:, 7] = 0
    w0 = torch.randn(6, 48, generator=g, dtype=f64).float().double()
    gram = (x.T @ x).float().double()  # float32-representable: both runs see the same matrix
    sparsity = 0.5 if pattern == "unstructured" else None
    w = w0.float()
    res = obs_prune_(w, gram.float(), sparsity=sparsity, pattern=pattern, scope=scope, blocksize=16)
    ref_w, ref_keep, _ = reference.obs_prune(w0, gram, sparsity=sparsity, pattern=pattern, scope=scope, blocksize=16)
    assert torch.equal(res.mask, ref_keep)
    torch.testing.assert_close(w.double(), ref_w, rtol=1e-4, atol=1e-4)
    assert bool((w[~res.mask] == 0).all()) and not bool(torch.signbit(w[~res.mask]).any())  # +0, not -0


def test_single_deletion_is_the_least_squares_optimum():
    """OBS's closed form dw = -w_q/[H^-1]_qq H^-1 e_q equals the least-squares re-fit with w_q = 0."""
    w, x, gram = _layer(3, 6, tokens=20)
    hinv = torch.linalg.inv(2 * gram)
    for r in range(w.shape[0]):
        for q in range(w.shape[1]):
            closed = w[r] - w[r, q] / hinv[q, q] * hinv[:, q]
            free = [j for j in range(w.shape[1]) if j != q]
            # minimise ||X (w' - w)||^2 with w'_q = 0: X_F dF = x_q w_q
            d_free = torch.linalg.lstsq(x[:, free], x[:, q:q + 1] * w[r, q]).solution[:, 0]
            best = w[r].clone()
            best[free] += d_free
            best[q] = 0
            torch.testing.assert_close(closed, best, rtol=1e-9, atol=1e-9)
            # and the saliency w_q^2 / (2 [H^-1]_qq) is the error it leaves
            err = (x @ (best - w[r])).square().sum()
            assert float(err) == pytest.approx(float(w[r, q] ** 2 / (2 * hinv[q, q])), rel=1e-9)


def test_sweep_step_is_the_least_squares_optimum_of_its_free_set():
    """One deletion per row, damp 0: the row equals the least-squares re-fit of the columns right of the deletion."""
    w0, x, gram = _layer(4, 7, tokens=30, seed=1)
    w = w0.clone()
    res = obs_prune_(w, gram, sparsity=1 / 7, blocksize=7, damp=0.0, dtype=f64)
    for r in range(4):
        q = int((~res.mask[r]).nonzero())
        free = list(range(q + 1, 7))
        best = w0[r].clone()
        best[q] = 0
        if free:
            best[free] += torch.linalg.lstsq(x[:, free], x[:, q:q + 1] * w0[r, q]).solution[:, 0]
        torch.testing.assert_close(w[r], best, rtol=1e-8, atol=1e-9)
    # the deletion chosen is the lowest surgeon saliency of the row
    u = torch.linalg.cholesky(torch.linalg.inv(2 * gram), upper=True)
    sal = w0.square() / u.diagonal().square()
    assert torch.equal((~res.mask).nonzero()[:, 1], sal.argmin(1))


@pytest.mark.parametrize("pattern, scope", [("unstructured", "row"), ("unstructured", "layer"), ("2:4", "row"),
                                            ("4:8", "row")])
def test_reconstruction_error_below_layerwise_obd(pattern, scope):
    w0, x, gram = _layer(24, 64, tokens=256, seed=3, dtype=torch.float32)
    w = w0.clone()
    obs_prune_(w, gram.float(), sparsity=None if pattern != "unstructured" else 0.5, pattern=pattern, scope=scope,
               blocksize=32)
    wanda = w0.clone()
    h = (2 * gram.diagonal()).float().expand_as(wanda).contiguous()
    obd_ext.prune_([wanda], [h], pattern=pattern, sparsity=None if pattern != "unstructured" else 0.5, scope=scope)
    xf = x.float()
    err_obs = float((xf @ (w - w0).T).square().sum())
    err_obd = float((xf @ (wanda - w0).T).square().sum())
    assert err_obs < 0.8 * err_obd, (err_obs, err_obd)


def test_float32_multi_block_meets_the_sparsity():
    w, _, gram = _layer(16, 300, seed=4, dtype=torch.float32)
    res = obs_prune_(w, gram.float(), sparsity=0.5, blocksize=128)
    assert ((w == 0).sum(1) == 150).all() and res.deleted == 16 * 150
    assert bool(torch.isfinite(w).all())


def test_bf16_weights_are_written_in_their_dtype():
    w0, _, gram = _layer(6, 32, seed=5, dtype=torch.bfloat16)
    w = w0.clone()
    res = obs_prune_(w, gram.float(), pattern="2:4", blocksize=16)
    w32 = w0.float()
    res32 = obs_prune_(w32, gram.float(), pattern="2:4", blocksize=16)
    assert w.dtype == torch.bfloat16
    assert torch.equal(res.mask, res32.mask)
    assert torch.equal(w, w32.to(torch.bfloat16))
    obd_ext.check_nm_pattern(w, "2:4", "w")


def test_writes_through_a_transposed_view():
    w0, _, gram = _layer(5, 8, seed=6)
    stored = w0.t().contiguous()  # like transformers' Conv1D: [in, out]
    res = obs_prune_(stored.t(), gram, sparsity=0.5, blocksize=4, dtype=f64)
    ref_w, _, _ = reference.obs_prune(w0, gram, sparsity=0.5, blocksize=4)
    torch.testing.assert_close(stored.t(), ref_w)
    assert res.deleted == 20


def test_all_inputs_dead():
    w = torch.randn(3, 8, dtype=f64)
    res = obs_prune_(w, torch.zeros(8, 8, dtype=f64), sparsity=0.5, dtype=f64)
    assert res.dead_inputs == 8 and res.predicted_increase == 0
    # equal saliencies (all 0) are deleted in index order: the first half of every row
    assert torch.equal(res.mask, torch.arange(8).expand(3, 8) >= 4)


def test_empty_layers():
    for rows, cols, pattern in ((0, 8, "unstructured"), (3, 0, "unstructured"), (0, 8, "2:4")):
        w = torch.zeros(rows, cols)
        res = obs_prune_(w, torch.eye(cols), sparsity=0.5 if pattern == "unstructured" else None, pattern=pattern,
                         blocksize=8)
        assert res.deleted == 0 and res.predicted_increase == 0 and res.mask.shape == (rows, cols)
    assert repr(res) == "SurgeonResult(shape=[0, 8], deleted=0, predicted_increase=0, damp=0.01, dead_inputs=0)"


@pytest.mark.parametrize("change, message", [
    (dict(gram=torch.full((8, 8), float("nan"))), "Gram matrix X^T X is not finite at [0, 0]"),
    (dict(gram=torch.eye(5)), r"must be a floating [8, 8] tensor"),
    (dict(weight=torch.ones(8)), "2-D floating tensor"),
    (dict(pattern="2:4", sparsity=None, blocksize=6), "blocksize to be a multiple of 4"),
    (dict(pattern="3:5", sparsity=None, blocksize=5), "number of inputs to be a multiple of 5"),
    (dict(scope="global"), "per 'row' or per 'layer'"),
    (dict(damp=-1.0), "damp must be a finite number >= 0"),
    (dict(blocksize=0), "blocksize must be an integer >= 1"),
    (dict(sparsity=1.5), "sparsity must be a number in [0, 1]"),
    (dict(pattern="2:4", sparsity=0.3), "implies sparsity 0.5"),
    (dict(gram=-torch.eye(8)), "negative diagonal entry"),
    (dict(weight=torch.tensor([[float("inf")] * 8] * 2)), "weight is not finite at [0, 0]"),
    (dict(dtype=torch.float16), "dtype must be torch.float32 or torch.float64"),
], ids=lambda v: str(v)[:40])
def test_bad_inputs_change_nothing(change, message):
    w0, _, gram = _layer(2, 8, dtype=torch.float32)
    args = dict(weight=w0.clone(), gram=gram.float(), sparsity=0.5, pattern="unstructured", scope="row",
                blocksize=4, damp=0.01, dtype=torch.float32)
    args.update(change)
    weight = args.pop("weight")
    gram = args.pop("gram")
    before = weight.clone()
    with pytest.raises(ValueError, match="layer7") as e:
        obs_prune_(weight, gram, name="layer7", **args)
    assert message in str(e.value)
    assert torch.equal(weight, before)


def test_factorisation_failure_retries_then_names_the_layer():
    w0 = torch.randn(2, 2, dtype=f64)
    with pytest.raises(RuntimeError, match="fc1.*could not be factorised"):
        obs_prune_(w0.clone(), torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=f64), sparsity=0.5, damp=0.0, name="fc1")
    w = w0.clone()
    with pytest.warns(RuntimeWarning, match="fc2: the layer's Hessian needed damp="):
        nearly = torch.tensor([[1.0, 1.00001], [1.00001, 1.0]], dtype=f64)  # slightly indefinite
        res = obs_prune_(w, nearly, sparsity=0.5, damp=0.0, dtype=f64, name="fc2")
    assert res.damp > 0 and res.deleted == 2


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 3), nn.Linear(4, 5), nn.Linear(3, 2)

    def forward(self, x):
        return self.c(self.a(x) + self.b(x)[..., :3])


def test_gram_stats_share_one_matrix_per_input():
    torch.manual_seed(0)
    net = _TwoHeads().double()
    x = [torch.randn(2, 5, 4, dtype=f64) for _ in range(3)]
    with GramStats(prunable_layers(net), acc_dtype=f64) as stats:
        for v in x:
            net(v)
    xs = torch.cat([v.reshape(-1, 4) for v in x])
    torch.testing.assert_close(stats.gram("a"), xs.T @ xs)
    assert stats.gram("b") is stats.gram("a") and stats.shared() == {"a": ["a", "b"], "c": ["c"]}
    hidden = torch.cat([(net.a(v) + net.b(v)[..., :3]).reshape(-1, 3) for v in x])
    torch.testing.assert_close(stats.gram("c"), hidden.T @ hidden)
    torch.testing.assert_close(stats.column_sums("c"), reference.column_sq_sum(hidden, f64))
    assert stats.rows == {"a": 30, "b": 30, "c": 30}
    # a layer that shared its input and then does not is an error, not a wrong matrix
    with GramStats(prunable_layers(net)):
        net(x[0])
        with pytest.raises(RuntimeError, match="'b' shared its input with 'a'"):
            net.b(x[1])
    with pytest.raises(ValueError, match="Conv2d"):
        GramStats({"conv": nn.Conv2d(1, 1, 3)})


def test_gram_stats_share_q_k_v_and_gate_up_of_a_llama_block():
    tf = pytest.importorskip("transformers")
    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(cfg).eval()
    block = model.model.layers[0]
    with GramStats(prunable_layers(block)) as stats, torch.no_grad():
        for _ in range(2):
            model(torch.randint(0, 100, (2, 16)))
    assert stats.shared() == {"self_attn.q_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                              "self_attn.o_proj": ["self_attn.o_proj"],
                              "mlp.gate_proj": ["mlp.gate_proj", "mlp.up_proj"],
                              "mlp.down_proj": ["mlp.down_proj"]}
    assert stats.rows["self_attn.v_proj"] == stats.rows["mlp.down_proj"] == 64


# ---------------------------------------------------------------------------
# Block by block: prune_layerwise(method="layerwise-obs")
# ---------------------------------------------------------------------------

def _gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(vocab=61, d=32, layers=2, heads=4, seq=16, tied=True).eval()


def _batches(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 61, (4, 16), generator=g) for _ in range(n)]


def _calibration_loss(model, batches):
    with torch.no_grad():
        return sum(float(F.cross_entropy(model(b).reshape(b.shape[0], b.shape[1], -1)[:, :-1].reshape(-1, 61),
                                         b[:, 1:].reshape(-1))) for b in batches) / len(batches)


def test_prune_layerwise_obs_is_obs_prune_on_each_layer():
    model, calib = _gpt().double(), _batches(1)
    manual = copy.deepcopy(model)
    result = prune_layerwise(model, calib, method="layerwise-obs", sparsity=0.5, scope="row", progress=False,
                             blocksize=16)
    # the same by hand: each block's dense-block Grams, every layer pruned, the pruned block feeds the next
    h = [manual.tok(b) + manual.pos(torch.arange(16)) for b in calib]
    reports = []
    for blk in manual.blocks:
        layers = prunable_layers(blk)
        with GramStats(layers, acc_dtype=f64) as stats:
            for v in h:
                blk(v)
        for n, m in layers.items():
            reports.append(obs_prune_(weight_rows(m), stats.gram(n), sparsity=0.5, blocksize=16, dtype=f64, name=n))
        with torch.no_grad():
            h = [blk(v) for v in h]
    for (n, p), q in zip(model.named_parameters(), manual.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=n)
    assert [r.deleted for r in result.layers] == [r.deleted for r in reports]
    assert result.method == "layerwise-obs" and result.sparsity == pytest.approx(0.5)
    assert result.layers[0].name == "blocks.0.qkv" and result.calibration_rows == 4 * 4 * 16


class _SharedBlock(nn.Module):
    """Two layers fed one tensor (like q/k/v), then one fed their sum."""

    def __init__(self, d=8):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)

    def forward(self, x):
        return x + self.c(torch.tanh(self.a(x) + self.b(x)[..., :x.shape[-1]]))


@pytest.mark.parametrize("pattern, scope", [("unstructured", "row"), ("unstructured", "layer"), ("2:4", "row")])
def test_layers_sharing_an_input_are_pruned_as_if_alone(pattern, scope):
    torch.manual_seed(0)
    blocks = nn.ModuleList([_SharedBlock(), _SharedBlock()]).double()
    model, manual = nn.Sequential(*blocks), copy.deepcopy(nn.Sequential(*blocks))
    calib = [torch.randn(3, 5, 8, dtype=f64) for _ in range(2)]
    result = prune_layerwise(model, calib, method="layerwise-obs", pattern=pattern, scope=scope, blocks=blocks,
                             blocksize=4, progress=False)
    h, expected = calib, []
    for blk in manual:
        with GramStats(prunable_layers(blk), acc_dtype=f64) as stats:
            for v in h:
                blk(v)
        assert stats.shared() == {"a": ["a", "b"], "c": ["c"]}
        for n, m in prunable_layers(blk).items():
            r = obs_prune_(weight_rows(m), stats.gram(n), sparsity=0.5 if pattern == "unstructured" else None,
                           pattern=pattern, scope=scope, blocksize=4, dtype=f64, name=n)
            expected.append((r.deleted, r.predicted_increase))
        with torch.no_grad():
            h = [blk(v) for v in h]
    for p, q in zip(model.parameters(), manual.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert [r.deleted for r in result.layers] == [d for d, _ in expected]
    assert [r.predicted_increase for r in result.layers] == pytest.approx([p for _, p in expected], rel=1e-9)


@pytest.mark.parametrize("method", ["layerwise-obs", "layerwise-obd"])
def test_sequential_prunes_later_stages_on_pruned_inputs(method):
    calib = _batches(2)
    a, b = _gpt(), _gpt()
    prune_layerwise(a, calib, method=method, pattern="2:4", progress=False)
    prune_layerwise(b, calib, method=method, pattern="2:4", progress=False, sequential=True)
    blk_a, blk_b = a.blocks[0], b.blocks[0]
    assert torch.equal(blk_a.qkv.weight, blk_b.qkv.weight)  # the first stage sees the same inputs
    assert not torch.equal(blk_a.proj.weight, blk_b.proj.weight)  # later stages see the pruned qkv's outputs
    for m in prunable_layers(b).values():
        obd_ext.check_nm_pattern(m.weight, "2:4", "w")


def _last_hidden(model, batches):
    with torch.no_grad():
        out = []
        for b in batches:
            x = model.tok(b) + model.pos(torch.arange(b.shape[1]))
            for blk in model.blocks:
                x = blk(x)
            out.append(x)
    return torch.cat(out)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_surgeon_reconstructs_better_than_layerwise_obd(pattern):
    """On tiny random models, the blocks' output on the calibration data moves less (5 of 5 seeds), and at
    2:4 the calibration loss rises less too (at 50% unstructured the loss of a random model is too noisy a
    judge: measured 4 of 5 seeds)."""
    for seed in range(2):
        dense, calib = _gpt(seed), _batches(seed + 1, 8)
        base, h0 = _calibration_loss(dense, calib), _last_hidden(dense, calib)
        rise, moved = {}, {}
        for method in ("layerwise-obd", "layerwise-obs"):
            m = copy.deepcopy(dense)
            prune_layerwise(m, calib, method=method, pattern=pattern, sparsity=0.5, progress=False)
            rise[method] = _calibration_loss(m, calib) - base
            moved[method] = float((_last_hidden(m, calib) - h0).square().mean())
        assert moved["layerwise-obs"] < 0.9 * moved["layerwise-obd"], (seed, moved)
        if pattern == "2:4":
            assert 0 < rise["layerwise-obs"] < 0.6 * rise["layerwise-obd"], (seed, rise)


def test_magnitude_runs_no_calibration_forward():
    model = _gpt()
    calls = []
    for blk in model.blocks:
        blk.register_forward_pre_hook(lambda *a: calls.append(1))

    class Untouchable:
        def __iter__(self):
            raise AssertionError("magnitude iterated the calibration data")

    result = prune_layerwise(model, Untouchable(), method="magnitude", sparsity=0.5, progress=False)
    assert calls == [] and result.sparsity == pytest.approx(0.5) and result.calibration_rows == 0


@pytest.mark.parametrize("kw, message", [
    (dict(method="layerwise-obd", blocksize=64), "blocksize=64 applies to method='layerwise-obs' only"),
    (dict(method="magnitude", damp=0.1), "damp=0.1 applies to method='layerwise-obs' only"),
    (dict(method="layerwise-obs", scope="global"), "not scope='global'"),
    (dict(method="layerwise-obs", pattern="2:4", blocksize=6), "blocksize to be a multiple of 4"),
    (dict(method="layerwise-obs", damp=float("nan")), "damp must be a finite number"),
    (dict(method="layerwise-obs", blocksize=0), "blocksize must be an integer >= 1"),
    (dict(method="layerwise-obs", sequential="yes"), "sequential must be True or False"),
], ids=str)
def test_prune_layerwise_checks_surgeon_options_before_pruning(kw, message):
    model = _gpt()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="prune_layerwise") as e:
        prune_layerwise(model, _batches(0), progress=False, **kw)
    assert message in str(e.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_prune_layerwise_obs_refuses_convolutions_before_pruning():
    class Blk(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.conv = nn.Linear(4, 4), nn.Conv1d(4, 4, 1)

        def forward(self, x):
            return self.conv(self.fc(x).transpose(1, 2)).transpose(1, 2)

    blocks = nn.ModuleList([Blk(), Blk()])
    model = nn.Sequential(*blocks)
    w = blocks[0].fc.weight.clone()
    with pytest.raises(ValueError, match="block 0 layer 'conv' is a Conv1d"):
        prune_layerwise(model, [torch.randn(2, 3, 4)], method="layerwise-obs", blocks=blocks, progress=False)
    assert torch.equal(blocks[0].fc.weight, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern,scope", [("unstructured", "row"), ("unstructured", "layer"), ("2:4", "row")])
def test_deleted_weights_are_positive_zeros(dtype, pattern, scope):
    # -0.0 is a zero to == but not to every consumer (a sign bit in a 2:4
    # checkpoint has made serving kernels misbehave): deletions are +0.0
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 48, generator=g)
    w = (torch.randn(24, 48, generator=g) * 1e-3).to(dtype)
    r = obs_prune_(w, x.t() @ x, sparsity=None if pattern == "2:4" else 0.5, pattern=pattern, scope=scope)
    deleted = ~r.mask if r.mask.shape == w.shape else ~r.mask.t()
    assert bool((w[deleted] == 0).all()) and not bool(torch.signbit(w[deleted]).any())
