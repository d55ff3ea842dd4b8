"""Layer-wise OBD (obd_ext.layerwise): statistics against autograd Hessians, Wanda equivalence, block-wise pruning."""

import copy
import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import obd_ext
from obd_ext import reference
from obd_ext.layerwise import (CalibrationStats, block_hidden_states, capture_block_inputs, find_blocks,
                               forward_blockwise, next_block_inputs, prunable_layers, prune_by_saliency_,
                               prune_layerwise)
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
    result = prune_layerwise(ours, batches, sparsity=sparsity, method="layerwise-obd", progress=False)
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
        obd_ext.check_nm_pattern(layer.weight, pattern, name)
        assert int((layer.weight == 0).sum()) == layer.weight.numel() * (m - n) // m


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_layer_and_global_scopes(scope):
    model = _gpt()
    batches = [torch.randint(0, 61, (2, 16))]
    result = prune_layerwise(model, batches, sparsity=0.5, scope=scope, method="layerwise-obd", progress=False)
    per_block = {}
    for r in result.layers:
        per_block.setdefault(".".join(r.name.split(".")[:2]), []).append(r)  # "blocks.0"
        if scope == "layer":
            assert r.deleted == round(0.5 * r.total)
    for reports in per_block.values():  # each block's pool holds the target in total
        assert abs(sum(r.deleted for r in reports) - 0.5 * sum(r.total for r in reports)) <= 1
    assert all(r.predicted_increase >= 0 for r in result.layers)


def test_magnitude_method_needs_no_statistics_and_matches_prune_layers():
    model = _gpt()
    expected = copy.deepcopy(model)
    r = prune_layerwise(model, [torch.randint(0, 61, (2, 16))], sparsity=0.4, scope="layer", method="magnitude",
                        progress=False)
    assert (r.method, r.scope, r.calibration_rows) == ("magnitude", "layer", 0)
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


def test_layer_names_are_the_models_own():
    model = _gpt()
    r = prune_layerwise(model, [torch.randint(0, 61, (2, 16))], progress=False)
    own = dict(model.named_modules())
    assert [x.name for x in r.layers] == [n for n, m in own.items() if n.startswith("blocks.")
                                          and isinstance(m, nn.Linear)]
    assert r.layers[0].name == "blocks.0.qkv"


def test_vocabulary_defaults_and_conflicts():
    batches = [torch.randint(0, 61, (2, 16))]
    r = prune_layerwise(_gpt(), batches, progress=False)  # the default method is the one that measured best
    assert (r.method, r.scope, r.pattern, r.sparsity_target) == ("layerwise-obs", "layer", "unstructured", 0.5)
    assert repr(r).startswith("LayerwiseResult(method='layerwise-obs', pattern='unstructured', scope='layer', "
                              "sparsity_target=0.5, sparsity=0.5, layers=12, calibration_rows=32, seconds=")
    r = prune_layerwise(_gpt(), batches, pattern="1:4", progress=False)  # sparsity implied by the pattern
    assert (r.scope, r.sparsity_target) == ("row", 0.75) and r.sparsity == pytest.approx(0.75)
    assert prune_layerwise(_gpt(), batches, pattern="2:4", sparsity=0.5, progress=False).sparsity == 0.5
    model = _gpt()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError,
                       match=r"pattern='2:4' deletes 2 of every 4 \(sparsity 0.5\); sparsity=0.7 conflicts"):
        prune_layerwise(model, batches, pattern="2:4", sparsity=0.7)
    with pytest.raises(ValueError,
                       match=r"pattern='2:4' selects within rows; scope must be None or 'row', got 'layer'"):
        prune_layerwise(model, batches, pattern="2:4", scope="layer")
    with pytest.raises(ValueError, match=r"method='obd' is not accepted by prune_layerwise .*obd_ext.hessian_diag"):
        prune_layerwise(model, batches, method="obd")
    with pytest.raises(ValueError, match=r"method must be one of \('layerwise-obd', 'layerwise-obs', "
                                         r"'magnitude'\).*got 'layerwise'"):
        prune_layerwise(model, batches, method="layerwise")
    with pytest.raises(TypeError):
        prune_layerwise(model, batches, criterion="obd")  # the old keyword is gone, not silently accepted
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # refused before any change


def test_next_block_inputs_is_the_block_loop():
    model = _gpt()
    x = torch.randint(0, 61, (2, 16))
    inputs = capture_block_inputs(model, model.blocks[0], [x], lambda m, b: m(b))
    for blk in model.blocks:
        inputs = next_block_inputs(blk, inputs)
    logits = model.ln(block_hidden_states(*inputs[0])) @ model.tok.weight.t()
    torch.testing.assert_close(logits.reshape(-1, 61), model(x), rtol=0, atol=0)


def test_forward_blockwise_gives_the_models_outputs_and_restores_it():
    model = _gpt().double()
    batches = [torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    blocks_before = list(model.blocks)
    state = copy.deepcopy(model.state_dict())
    got = []
    forward_blockwise(model, batches, lambda b, out: got.append((b, out)), device="cpu")
    assert [b for b, _ in got] == batches
    for b, out in got:
        torch.testing.assert_close(out, model(b), rtol=1e-13, atol=1e-13)
    assert list(model.blocks) == blocks_before and not model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="blocks must be the model's non-empty nn.ModuleList"):
        forward_blockwise(model, batches, lambda b, out: None, blocks=list(model.blocks))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="streams blocks from CPU memory to a GPU")
def test_forward_blockwise_has_one_block_on_the_device_at_a_time():
    model = _gpt().double()
    seen = []

    def hook(block, args):
        seen.append([next(b.parameters()).device.type for b in model.blocks])
        assert args[0].device.type == "cuda"

    handles = [b.register_forward_pre_hook(hook) for b in model.blocks]
    x = torch.randint(0, 61, (2, 16))
    got = []
    forward_blockwise(model, [x], lambda b, out: got.append(out), device="cuda")
    for h in handles:
        h.remove()
    # the capture pass stops at block 0 with no block on the device; then each block alone on it
    assert seen == [["cpu"] * 3] + [["cuda" if j == i else "cpu" for j in range(3)] for i in range(3)]
    assert all(p.device.type == "cpu" for p in model.parameters())
    torch.testing.assert_close(got[0].cpu(), model(x), rtol=1e-10, atol=1e-10)


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
        prune_layerwise(model, batches, method="layerwise-obd", progress=False)
    with pytest.raises(ValueError, match=r"calibration statistics X\^T X of layer 'qkv' are not finite"):
        prune_layerwise(model, batches, progress=False)  # the default, layerwise-obs
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


def save_tiny_lm(kind: str, path):
    """A tiny random GPT-2 or Llama and its tokenizer, saved with save_pretrained to ``path``."""
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
    return request.param, save_tiny_lm(request.param, tmp_path_factory.mktemp(request.param) / "model")


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    """A short held-out text (a few hundred tokens), so that evaluation takes little time."""
    p = tmp_path_factory.mktemp("text") / "eval.txt"
    p.write_text(inspect.getsource(pytest.approx)[:1500])
    return p


def test_prune_llm_cli_saves_a_model_that_loads_in_plain_transformers(tiny_lm, calib_file, eval_file, tmp_path):
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    kind, model_dir = tiny_lm
    out = tmp_path / "pruned"
    proc = subprocess.run([sys.executable, "-m", "obd_ext", "prune-llm", str(model_dir), "--sparsity", "0.5",
                           "--pattern", "2:4", "--calib", str(calib_file), "--eval", str(eval_file), "--out", str(out),
                           "--nsamples", "8",
                           "--seq-len", "32", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "perplexity" in proc.stdout
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    prefix, blocks = find_blocks(model)
    for name, layer in prunable_layers(blocks).items():
        w = obd_ext.layerwise.weight_rows(layer)
        obd_ext.check_nm_pattern(w, "2:4", name)  # rows = outputs (GPT-2's Conv1D stores [in, out])
        assert int((w == 0).sum()) == w.numel() // 2
    import json

    report = json.loads((out / "prune_report.json").read_text())
    assert report["perplexity_after"] > 0 and report["detail"]["sparsity"] == pytest.approx(0.5)


@pytest.mark.parametrize("method", ["layerwise-obd", "layerwise-obs", "magnitude", "lm"])
def test_prune_llm_methods(tiny_lm, calib_file, eval_file, method):
    from obd_ext.layerwise import hf

    kind, model_dir = tiny_lm
    r = hf.prune_llm(str(model_dir), None, calib=str(calib_file), eval_text=str(eval_file), sparsity=0.5,
                     nsamples=8, seq_len=32, method=method, progress=False)
    assert r["detail"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert r["perplexity_before"] > 1 and r["perplexity_after"] > 1
    # the scope actually used, the same at the top and in the detail (magnitude included)
    assert r["scope"] == r["detail"]["scope"] == {"lm": "global", "layerwise-obs": "layer"}.get(method, "row")
    assert r["method"] == r["detail"]["method"] == method


def test_blockwise_perplexity_equals_whole_model_perplexity(tiny_lm):
    from obd_ext.layerwise import hf

    kind, model_dir = tiny_lm
    model, tok = hf.load_causal_lm(str(model_dir))
    model = model.double()
    ids = hf.text_blocks(tok, TEXT[:20000], 24)[:11]  # 11 windows: the last batch of 4 is partial
    whole = hf.perplexity(model, ids, batch_size=4)
    blocks_before = list(find_blocks(model)[1])
    for device in (None, "cpu"):
        assert hf.blockwise_perplexity(model, ids, device=device, batch_size=4) == pytest.approx(whole, rel=1e-12)
    assert list(find_blocks(model)[1]) == blocks_before  # the blocks are back in place
    if torch.cuda.is_available():
        on_gpu = hf.blockwise_perplexity(model, ids, device="cuda", batch_size=4)
        assert on_gpu == pytest.approx(whole, rel=1e-10)
        assert all(p.device.type == "cpu" for p in model.parameters())
    assert 1 < whole < float("inf")


def test_prune_llm_report(tiny_lm, calib_file, eval_file, tmp_path):
    import json

    import transformers

    from obd_ext.layerwise import hf

    kind, model_dir = tiny_lm
    out = tmp_path / "out"
    r = hf.prune_llm(str(model_dir), str(out), calib=str(calib_file), eval_text=str(eval_file), pattern="2:4",
                     nsamples=4, seq_len=16, seed=3, method="magnitude", progress=False)
    on_disk = json.loads((out / "prune_report.json").read_text())
    assert on_disk == json.loads(json.dumps(r))
    assert on_disk["calib"] == str(calib_file) and on_disk["eval"] == str(eval_file)
    assert on_disk["calib_portion"] == "all" and on_disk["eval_tokens"] > 0
    assert (on_disk["seed"], on_disk["nsamples"], on_disk["seq_len"]) == (3, 4, 16)
    assert (on_disk["method"], on_disk["pattern"], on_disk["scope"], on_disk["sparsity_target"]) == \
        ("magnitude", "2:4", "row", 0.5)
    assert on_disk["detail"]["scope"] == "row" and on_disk["detail"]["pattern"] == "2:4"
    assert on_disk["versions"] == {"obd_ext": obd_ext.__version__, "torch": torch.__version__,
                                   "transformers": transformers.__version__, "python": on_disk["versions"]["python"]}
    model, _ = hf.load_causal_lm(str(model_dir))
    own = dict(model.named_modules())
    names = [layer["name"] for layer in on_disk["detail"]["layers"]]
    assert names and all(n in own for n in names)
    assert names[0] == ("transformer.h.0.attn.c_attn" if kind == "gpt2" else "model.layers.0.self_attn.q_proj")


def test_prune_llm_surgeon_settings_are_used_and_reported(tiny_lm, calib_file):
    from obd_ext.layerwise import hf

    kind, model_dir = tiny_lm
    r = hf.prune_llm(str(model_dir), None, calib=str(calib_file), pattern="2:4", nsamples=4, seq_len=16,
                     method="layerwise-obs", blocksize=16, damp=0.05, sequential=True, evaluate=False, progress=False)
    assert (r["method"], r["blocksize"], r["damp"], r["sequential"]) == ("layerwise-obs", 16, 0.05, True)
    assert r["detail"]["sparsity"] == 0.5 and all(layer["predicted_increase"] > 0 for layer in r["detail"]["layers"])
    r = hf.prune_llm(str(model_dir), None, calib=str(calib_file), nsamples=4, seq_len=16, evaluate=False,
                     progress=False)
    assert (r["method"], r["sequential"]) == ("layerwise-obs", False)  # the default
    r = hf.prune_llm(str(model_dir), None, calib=str(calib_file), nsamples=4, seq_len=16, evaluate=False,
                     method="layerwise-obd", progress=False)
    assert (r["method"], r["blocksize"], r["damp"], r["sequential"]) == ("layerwise-obd", None, None, False)
    with pytest.raises(ValueError, match="blocksize and damp apply to method='layerwise-obs' only, not method='lm'"):
        hf.prune_llm(str(model_dir), None, calib=str(calib_file), method="lm", damp=0.1, evaluate=False)


def test_prune_llm_saves_before_evaluating(tiny_lm, calib_file, eval_file, tmp_path, monkeypatch):
    import json

    from transformers import AutoModelForCausalLM

    from obd_ext.layerwise import hf

    kind, model_dir = tiny_lm
    calls = []
    real = hf.perplexity

    def failing_after(model, blocks, **kw):  # the "after" evaluation runs out of memory
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, blocks, **kw)

    monkeypatch.setattr(hf, "perplexity", failing_after)
    out = tmp_path / "out"
    with pytest.raises(torch.OutOfMemoryError):
        hf.prune_llm(str(model_dir), str(out), calib=str(calib_file), eval_text=str(eval_file), nsamples=4,
                     seq_len=16, progress=False)
    report = json.loads((out / "prune_report.json").read_text())
    assert report["perplexity_before"] > 1 and report["perplexity_after"] is None
    assert report["detail"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    pruned = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    layer = pruned.get_submodule(report["detail"]["layers"][0]["name"])
    assert int((layer.weight == 0).sum()) == report["detail"]["layers"][0]["deleted"] > 0


def test_prune_llm_without_evaluation(tiny_lm, calib_file, monkeypatch):
    from obd_ext.layerwise import hf

    def never(*a, **kw):
        raise AssertionError("perplexity evaluated with evaluate=False")

    monkeypatch.setattr(hf, "perplexity", never)
    monkeypatch.setattr(hf, "blockwise_perplexity", never)
    kind, model_dir = tiny_lm
    r = hf.prune_llm(str(model_dir), None, calib=str(calib_file), nsamples=4, seq_len=16, evaluate=False,
                     device="cpu", progress=False)
    assert r["perplexity_before"] is None and r["perplexity_after"] is None and r["eval"] is None
    assert r["calib_portion"] == "all" and r["eval_tokens"] == 0


def test_prune_llm_device_evaluates_block_by_block(tiny_lm, calib_file, eval_file, monkeypatch):
    from obd_ext.layerwise import hf

    def whole(*a, **kw):
        raise AssertionError("the whole model was evaluated although a device was given")

    monkeypatch.setattr(hf, "perplexity", whole)
    kind, model_dir = tiny_lm
    r = hf.prune_llm(str(model_dir), None, calib=str(calib_file), eval_text=str(eval_file), nsamples=4,
                     seq_len=16, device="cpu", progress=False)
    assert r["device"] == "cpu" and r["perplexity_before"] > 1 and r["perplexity_after"] > 1


def test_prune_llm_checks_everything_before_loading(tiny_lm, calib_file, tmp_path, monkeypatch):
    from obd_ext.layerwise import hf

    def never(*a, **kw):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(hf, "_load_model", never)
    kind, model_dir = tiny_lm
    ok = dict(calib=str(calib_file), nsamples=4, seq_len=16, progress=False)
    cases = [
        (dict(ok, calib=str(tmp_path / "missing.txt")), FileNotFoundError, "calib: no such file"),
        (dict(ok, eval_text=str(tmp_path)), FileNotFoundError, "eval_text: is a directory"),
        (dict(ok, nsamples=0), ValueError, "nsamples must be an integer >= 1, got 0"),
        (dict(ok, seq_len=0), ValueError, "seq_len must be an integer >= 2, got 0"),
        (dict(ok, seq_len=65), ValueError, "seq_len=65 exceeds the model's context of 64 tokens"),
        (dict(ok, sparsity=1.5), ValueError, r"sparsity must be a number in \[0, 1\]"),
        (dict(ok, pattern="2:4", sparsity=0.7), ValueError, "sparsity=0.7 conflicts"),
        (dict(ok, method="layerwise"), ValueError, "method must be one of"),
        (dict(ok, device="cuda:99" if torch.cuda.is_available() else "cuda"), ValueError, "device: 'cuda"),
        (dict(ok, device="nonsense"), ValueError, "device: 'nonsense' is not a device"),
        (dict(ok, eval_text=str(calib_file), evaluate=False), ValueError, "eval_text was given with evaluate=False"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            hf.prune_llm(str(model_dir), None, **kwargs)
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\n")
    with pytest.raises(ValueError, match="the calibration text has .* tokens, fewer than seq_len=16"):
        hf.prune_llm(str(model_dir), None, **dict(ok, calib=str(short), evaluate=False))
    with pytest.raises(FileExistsError, match="is the model directory"):
        hf.prune_llm(str(model_dir), str(model_dir), **ok)
    with pytest.raises(FileExistsError, match="is inside the model directory"):
        hf.prune_llm(str(model_dir), str(model_dir / "pruned"), **ok)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        hf.prune_llm(str(model_dir), str(tmp_path / "full"), **ok)
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        hf.prune_llm(str(tmp_path), None, **ok)


def test_hf_row_scope_prunes_output_rows(tiny_lm, calib_file):
    from obd_ext.layerwise import hf

    kind, model_dir = tiny_lm
    model, tok = hf.load_causal_lm(str(model_dir))
    windows = hf.calibration_windows(tok, TEXT, 4, 32)
    prune_layerwise(model, windows.split(2), sparsity=0.25, scope="row", run=hf.run_causal_lm, progress=False)
    prefix, blocks = find_blocks(model)
    for name, layer in prunable_layers(blocks).items():
        w = obd_ext.layerwise.weight_rows(layer)
        per_row = (w == 0).sum(1)
        assert (per_row == int(0.25 * w.shape[1])).all(), name
