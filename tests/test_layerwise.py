"""Layer-wise OBD (obd_ext.layerwise): statistics against autograd Hessians, Wanda equivalence, block-wise pruning."""

import copy
import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import obd_ext
from obd_ext import reference
from obd_ext.layerwise import CalibrationStats, find_blocks, prunable_layers, prune_by_saliency_, prune_layerwise
from obd_ext.models import GPT


def _reconstruction_hessian_diag(forward, w0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Exact diagonal of the Hessian of sum ||f(x; W) - f(x; W0)||^2 at W0, by autograd (float64)."""
    target = forward(x, w0).detach()

    def loss(w):
        return (forward(x, w.reshape(w0.shape)) - target).square().sum()

    return torch.autograd.functional.hessian(loss, w0.reshape(-1).clone()).diagonal().reshape(w0.shape)


def test_linear_statistics_are_the_reconstruction_hessian():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).double()
    x = torch.randn(4, 7, 5, dtype=torch.float64)
    with CalibrationStats({"lin": lin}, acc_dtype=torch.float64) as stats:
        lin(x[:2])
        lin(x[2:])
    exact = _reconstruction_hessian_diag(lambda v, w: F.linear(v, w, lin.bias), lin.weight.detach(), x)
    torch.testing.assert_close(stats.curvature("lin"), exact, rtol=1e-12, atol=1e-12)
    assert stats.rows["lin"] == 28
    torch.testing.assert_close(stats.column_sums("lin"), reference.column_sq_sum(x, torch.float64))


@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1), dict(dilation=2, padding=2, groups=2)], ids=str)
def test_conv_statistics_are_the_reconstruction_hessian(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, **kw).double()
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    with CalibrationStats({"c": conv}, acc_dtype=torch.float64) as stats:
        conv(x)
    exact = _reconstruction_hessian_diag(
        lambda v, w: F.conv2d(v, w, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups),
        conv.weight.detach(), x)
    torch.testing.assert_close(stats.curvature("c"), exact.flatten(1), rtol=1e-12, atol=1e-12)
    conv1 = nn.Conv1d(3, 4, 3, padding=1).double()
    x1 = torch.randn(2, 3, 9, dtype=torch.float64)
    with CalibrationStats({"c": conv1}, acc_dtype=torch.float64) as s1:
        conv1(x1)
    exact1 = _reconstruction_hessian_diag(lambda v, w: F.conv1d(v, w, conv1.bias, padding=1), conv1.weight.detach(), x1)
    torch.testing.assert_close(s1.curvature("c"), exact1.flatten(1), rtol=1e-12, atol=1e-12)


def _gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(vocab=61, d=32, layers=3, heads=4, seq=16, tied=True).eval()


def _wanda(model: GPT, batches, sparsity: float):
    """A straightforward Wanda implementation: |W| * ||X_j||_2 per row, sort, zero the lowest, block by block."""
    x = [model.tok(b) + model.pos(torch.arange(b.shape[1])) for b in batches]
    for blk in model.blocks:
        linears = {n: m for n, m in blk.named_modules() if isinstance(m, nn.Linear)}
        norms = {n: 0 for n in linears}
        hooks = [m.register_forward_pre_hook(
            lambda mod, a, n=n: norms.__setitem__(n, norms[n] + a[0].reshape(-1, a[0].shape[-1]).double()
                                                  .square().sum(0))) for n, m in linears.items()]
        with torch.no_grad():
            for v in x:
                blk(v)
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for n, m in linears.items():
                score = m.weight.abs() * norms[n].sqrt()
                k = obd_ext.count_for_sparsity(sparsity, m.weight.shape[1])  # our rounding of k
                order = torch.sort(score, dim=1, stable=True).indices[:, :k]
                m.weight.scatter_(1, order, 0.0)
            x = [blk(v) for v in x]
    return model


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_row_scope_masks_equal_wanda(sparsity):
    model, batches = _gpt(), [torch.randint(0, 61, (4, 16), generator=torch.Generator().manual_seed(i))
                              for i in range(3)]
    ours = copy.deepcopy(model)
    result = prune_layerwise(ours, batches, sparsity=sparsity, progress=False)
    wanda = _wanda(copy.deepcopy(model), batches, sparsity)
    for (n, a), (_, b) in zip(ours.named_parameters(), wanda.named_parameters()):
        assert torch.equal(a == 0, b == 0), n
    assert len(result.layers) == 3 * 4 and abs(result.sparsity - sparsity) < 0.02
    assert ours.tok.weight.count_nonzero() == ours.tok.weight.numel()  # outside the blocks: left alone


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_patterns(pattern):
    n, m = (int(v) for v in pattern.split(":"))
    model = _gpt()
    batches = [torch.randint(0, 61, (2, 16))]
    prune_layerwise(model, batches, pattern=pattern, progress=False)
    for name, layer in prunable_layers(model.blocks).items():
        obd_ext.check_nm_pattern(layer.weight, n, m, name)
        assert int((layer.weight == 0).sum()) == layer.weight.numel() * (m - n) // m


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_layer_and_global_scopes(scope):
    model = _gpt()
    batches = [torch.randint(0, 61, (2, 16))]
    result = prune_layerwise(model, batches, sparsity=0.5, scope=scope, progress=False)
    per_block = {}
    for r in result.layers:
        per_block.setdefault(r.name.split(".")[0], []).append(r)
        if scope == "layer":
            assert r.deleted == round(0.5 * r.total)
    for reports in per_block.values():  # each block's pool holds the target in total
        assert abs(sum(r.deleted for r in reports) - 0.5 * sum(r.total for r in reports)) <= 1
    assert all(r.predicted_increase >= 0 for r in result.layers)


def test_magnitude_criterion_needs_no_statistics_and_matches_prune_layers():
    model = _gpt()
    expected = copy.deepcopy(model)
    prune_layerwise(model, [torch.randint(0, 61, (2, 16))], sparsity=0.4, scope="layer", criterion="magnitude",
                    progress=False)
    for name, layer in prunable_layers(expected.blocks).items():
        obd_ext.prune_layers_([layer.weight], [torch.ones_like(layer.weight)], sparsity=0.4)
    for a, b in zip(model.parameters(), expected.parameters()):
        assert torch.equal(a, b)


def test_device_streaming_gives_the_same_result():
    batches = [torch.randint(0, 61, (2, 16))]
    a, b = _gpt(), _gpt()
    prune_layerwise(a, batches, sparsity=0.5, progress=False)
    prune_layerwise(b, batches, sparsity=0.5, progress=False, device="cpu")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="streams blocks from CPU memory to a GPU")
def test_blocks_stream_to_cuda_and_back():
    batches = [torch.randint(0, 61, (2, 16))]
    a, b = _gpt(), _gpt()
    prune_layerwise(a, batches, sparsity=0.5, progress=False)
    prune_layerwise(b, batches, sparsity=0.5, progress=False, device="cuda")
    assert all(q.device.type == "cpu" for q in b.parameters())
    for p, q in zip(a.parameters(), b.parameters()):
        assert ((p == 0) != (q == 0)).float().mean() < 1e-3  # float rounding on another device may flip a tie


def test_errors():
    model = _gpt()
    batches = [torch.randint(0, 61, (2, 16))]
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\], got 1.5"):
        prune_layerwise(model, batches, sparsity=1.5)
    with pytest.raises(ValueError, match="pattern must be 'unstructured' or 'N:M'.*got '2-4'"):
        prune_layerwise(model, batches, pattern="2-4")
    with pytest.raises(ValueError, match="need 0 < N < M"):
        prune_layerwise(model, batches, pattern="4:2")
    with pytest.raises(ValueError, match="scope must be one of .*got 'block'"):
        prune_layerwise(model, batches, scope="block")
    with pytest.raises(ValueError, match="no batch reached the first block"):
        prune_layerwise(model, [], progress=False)
    with pytest.raises(ValueError, match="has no nn.ModuleList of repeated blocks"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))
    model.pos.weight.data[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"calibration statistics of layer 'qkv' are not finite"):
        prune_layerwise(model, batches, progress=False)
    with pytest.raises(RuntimeError, match="no calibration inputs reached layer 'lin'"):
        CalibrationStats({"lin": nn.Linear(2, 2)}).curvature("lin")


def test_stats_read_bf16_activations_without_upcast_copy():
    lin = nn.Linear(64, 8).bfloat16()
    x = torch.randn(32, 64).bfloat16()
    with CalibrationStats({"l": lin}) as s:
        lin(x)
    assert s.sums["l"].dtype == torch.float32
    assert torch.equal(s.sums["l"], obd_ext.ops.column_sq_sum_(torch.zeros(64), x.float()))


# ---------------------------------------------------------------------------
# Hugging Face transformers: tiny random Llama and GPT-2 saved to a directory
# ---------------------------------------------------------------------------

TEXT = inspect.getsource(inspect) + inspect.getsource(copy)  # real text that every machine has


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _save_tiny(kind: str, path):
    import transformers as tf

    tok = _tokenizer()
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=64)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = tf.LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny_lm(request, tmp_path_factory):
    pytest.importorskip("transformers")
    return request.param, _save_tiny(request.param, tmp_path_factory.mktemp(request.param) / "model")


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(TEXT)
    return p


def test_prune_llm_cli_saves_a_model_that_loads_in_plain_transformers(tiny_lm, calib_file, tmp_path):
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    kind, model_dir = tiny_lm
    out = tmp_path / "pruned"
    proc = subprocess.run([sys.executable, "-m", "obd_ext", "prune-llm", str(model_dir), "--sparsity", "0.5",
                           "--pattern", "2:4", "--calib", str(calib_file), "--out", str(out), "--nsamples", "8",
                           "--seq-len", "32", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "perplexity" in proc.stdout
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    prefix, blocks = find_blocks(model)
    for name, layer in prunable_layers(blocks).items():
        w = obd_ext.layerwise.weight_rows(layer)
        obd_ext.check_nm_pattern(w, 2, 4, name)  # rows = outputs (GPT-2's Conv1D stores [in, out])
        assert int((w == 0).sum()) == w.numel() // 2
    import json

    report = json.loads((out / "prune_report.json").read_text())
    assert report["perplexity_after"] > 0 and report["detail"]["sparsity"] == pytest.approx(0.5)


@pytest.mark.parametrize("method", ["layerwise", "magnitude", "lm"])
def test_prune_llm_methods(tiny_lm, calib_file, method):
    from obd_ext.layerwise import hf

    kind, model_dir = tiny_lm
    r = hf.prune_llm(str(model_dir), None, calib=str(calib_file), sparsity=0.5, nsamples=8, seq_len=32,
                     method=method, scope="row" if method != "lm" else "global", progress=False)
    assert r["detail"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert r["perplexity_before"] > 1 and r["perplexity_after"] > 1


def test_hf_row_scope_prunes_output_rows(tiny_lm, calib_file):
    from obd_ext.layerwise import hf

    kind, model_dir = tiny_lm
    model, tok = hf.load_causal_lm(str(model_dir))
    windows = hf.calibration_windows(tok, TEXT, 4, 32)
    prune_layerwise(model, windows.split(2), sparsity=0.25, run=hf.run_causal_lm, progress=False)
    prefix, blocks = find_blocks(model)
    for name, layer in prunable_layers(blocks).items():
        w = obd_ext.layerwise.weight_rows(layer)
        per_row = (w == 0).sum(1)
        assert (per_row == int(0.25 * w.shape[1])).all(), name
