"""bench/llm_data.py: the standard-library corpus, its split, tokenizer, blocks and perplexity (tiny subsets)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import llm_data  # noqa: E402

ROOT = llm_data.stdlib_root()


@pytest.fixture(scope="module")
def small_files():
    """A few dozen real stdlib files, spread over the sorted list (deterministic)."""
    files = llm_data.stdlib_files()
    return files[::max(1, len(files) // 24)][:24]


@pytest.fixture(scope="module")
def tokenizer(small_files):
    return llm_data.train_tokenizer(small_files, vocab_size=400)


def test_stdlib_files_real():
    files = llm_data.stdlib_files()
    assert files == llm_data.stdlib_files()
    rel = [p.relative_to(ROOT).as_posix() for p in files]
    assert rel == sorted(rel)
    assert len(files) > 300
    for r, p in zip(rel, files):
        parts = r.split("/")
        assert r.endswith(".py")
        assert not {"site-packages", "test", "tests", "idlelib"} & set(parts[:-1]), r
        assert not parts[-1].startswith("_sysconfigdata"), r
        assert p.stat().st_size <= llm_data.MAX_FILE_BYTES, r
    assert "os.py" in rel and "json/decoder.py" in rel


def test_stdlib_files_exclusions(tmp_path):
    keep = ["a.py", "pkg/__init__.py", "pkg/mod.py", "lib2to3/fixes/fix_x.py"]
    drop = ["notes.txt", "site-packages/x.py", "test/test_a.py", "pkg/tests/t.py", "idlelib/ed.py",
            "lib2to3/tests/data/bad.py", "_sysconfigdata__linux.py", "config-3.11-x86_64/python-config.py",
            "big.py"]
    for rel in keep + drop:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x = 1\n")
    (tmp_path / "big.py").write_text("#" * (llm_data.MAX_FILE_BYTES + 1))
    got = [p.relative_to(tmp_path).as_posix() for p in llm_data.stdlib_files(tmp_path)]
    assert got == sorted(keep)


def test_split_is_stable_and_partitions():
    # Pinned: the split is a function of the relative path alone, the same on every machine.
    assert [llm_data.split_of(p) for p in ["json/decoder.py", "os.py", "_compression.py", "datetime.py"]] == \
        ["train", "test", "val", "test"]
    files = llm_data.stdlib_files()
    splits = llm_data.split_files(files)
    assert list(splits) == list(llm_data.SPLITS)
    assert sorted(p for s in splits.values() for p in s) == sorted(files)
    assert all(splits[name] == sorted(splits[name], key=files.index) for name in splits)
    n = len(files)
    assert 0.8 * n < len(splits["train"]) < 0.97 * n
    assert len(splits["val"]) > 5 and len(splits["test"]) > 5
    # Digests: equal for equal text, different for different files.
    assert llm_data.split_digest(splits["val"]) == llm_data.split_digest(list(splits["val"]))
    assert llm_data.split_digest(splits["val"]) != llm_data.split_digest(splits["test"])


def test_tokenizer_deterministic_and_round_trips(small_files, tokenizer):
    assert tokenizer.get_vocab_size() == 400
    assert tokenizer.token_to_id(llm_data.EOS) is not None
    assert llm_data.train_tokenizer(small_files, vocab_size=400).to_str() == tokenizer.to_str()
    text = llm_data.read_text(small_files[0]) + "\n    naïve = 'ü€'\t\n"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8"))  # merges were learned


def test_token_blocks(small_files, tokenizer):
    files = small_files[:5]
    eos = tokenizer.token_to_id(llm_data.EOS)
    stream = []
    for p in files:
        stream += tokenizer.encode(llm_data.read_text(p), add_special_tokens=False).ids + [eos]
    b = llm_data.token_blocks(tokenizer, files, 64)
    assert b.dtype == torch.long and b.shape == (len(stream) // 64, 64)
    assert b.reshape(-1).tolist() == stream[:b.numel()]
    assert int((b == eos).sum()) == stream[:b.numel()].count(eos) >= 1
    capped = llm_data.token_blocks(tokenizer, files, 64, max_tokens=200)
    assert torch.equal(capped, b[:3])
    assert llm_data.token_blocks(tokenizer, files[:1], 10 ** 7).shape == (0, 10 ** 7)
    assert llm_data.token_blocks(tokenizer, [], 64).shape == (0, 64)
    with pytest.raises(ValueError):
        llm_data.token_blocks(tokenizer, files, 0)


def test_saved_tokenizer_matches(tmp_path, small_files, tokenizer):
    llm_data.save_tokenizer(tokenizer, tmp_path)
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert auto.eos_token == llm_data.EOS
    for tok in (auto, llm_data.load_tokenizer(tmp_path)):
        assert torch.equal(llm_data.token_blocks(tok, small_files[:3], 32),
                          llm_data.token_blocks(tokenizer, small_files[:3], 32))


class _Bigram(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, x):
        return self.table(x)


def test_perplexity_against_manual():
    torch.manual_seed(0)
    model = _Bigram(50)
    blocks = torch.randint(0, 50, (7, 9))
    logp = model.table.weight.detach().log_softmax(-1)
    nll = -logp[blocks[:, :-1], blocks[:, 1:]].double().mean()
    model.train()
    for bs in (1, 3, 8):
        assert llm_data.perplexity(model, blocks, batch_size=bs) == pytest.approx(math.exp(float(nll)), rel=1e-5)
    assert model.training  # mode restored
    torch.nn.init.zeros_(model.table.weight)  # uniform prediction: perplexity = vocabulary size
    assert llm_data.perplexity(model, blocks) == pytest.approx(50.0, rel=1e-6)
    assert math.isnan(llm_data.perplexity(model, blocks[:0]))
    with pytest.raises(ValueError):
        llm_data.perplexity(model, blocks[0])


def test_unigram_perplexity():
    train = torch.tensor([[0, 0, 1, 1]])
    # add-one counts over vocab 4: p = [3, 3, 1, 1] / 8; eval predicts tokens 1 and 2.
    expect = math.exp(-(math.log(3 / 8) + math.log(1 / 8)) / 2)
    assert llm_data.unigram_perplexity(train, torch.tensor([[3, 1, 2]]), 4) == pytest.approx(expect)


def _tiny_gpt2(vocab: int, seq_len: int, eos: int):
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=seq_len, n_embd=32, n_layer=1, n_head=2,
                                     bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_perplexity_hf_model_matches_its_loss(small_files, tokenizer):
    blocks = llm_data.token_blocks(tokenizer, small_files[:3], 32)[:4]
    model = _tiny_gpt2(400, 32, tokenizer.token_to_id(llm_data.EOS))
    with torch.no_grad():
        loss = model(input_ids=blocks, labels=blocks).loss  # mean over all predicted tokens
    assert llm_data.perplexity(model, blocks, batch_size=3) == pytest.approx(math.exp(float(loss)), rel=1e-4)


def test_load_model_and_splits(tmp_path, small_files, tokenizer):
    seq_len = 32
    model = _tiny_gpt2(400, seq_len, tokenizer.token_to_id(llm_data.EOS))
    model.save_pretrained(str(tmp_path))
    llm_data.save_tokenizer(tokenizer, tmp_path)
    files = {"train": small_files[:4], "val": small_files[4:6], "test": small_files[6:8]}
    manifest = llm_data.split_manifest(files)
    (tmp_path / "splits.json").write_text(json.dumps(manifest))
    (tmp_path / "train_log.json").write_text(json.dumps({"config": {"seq_len": seq_len}}))

    cap = 8 * seq_len
    loaded, tok, blocks = llm_data.load_model_and_splits(tmp_path, splits=("val", "test"), max_tokens=cap)
    assert set(blocks) == {"val", "test"} and not loaded.training
    for name in blocks:
        assert blocks[name].shape == (8, seq_len)
        assert torch.equal(blocks[name], llm_data.token_blocks(tokenizer, files[name], seq_len, max_tokens=cap))
        assert llm_data.perplexity(loaded, blocks[name]) == pytest.approx(llm_data.perplexity(model, blocks[name]),
                                                                          rel=1e-5)

    manifest["splits"]["test"]["sha256"] = "0" * 64
    manifest["python_version"] = "2.7.18"
    (tmp_path / "splits.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning) as record:
        llm_data.load_model_and_splits(tmp_path, splits=("test",), max_tokens=cap)
    messages = " ".join(str(w.message) for w in record)
    assert "2.7.18" in messages and "differs" in messages


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_train_script_models(arch):
    """train_tiny_gpt.py --arch builds a tied-embedding causal LM whose blocks the layer-wise pruner finds."""
    import train_tiny_gpt
    from obd_ext.layerwise import find_blocks, prunable_layers

    args = train_tiny_gpt.parse_args(["--arch", arch, "--n-embd", "48", "--n-layer", "2", "--n-head", "2",
                                      "--vocab-size", "64", "--seq-len", "16"])
    model = train_tiny_gpt.make_model(args, eos_id=0)
    assert type(model).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[arch]
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    _, blocks = find_blocks(model)
    assert len(blocks) == 2
    names = set(prunable_layers(blocks[0]))
    if arch == "llama":  # SwiGLU, intermediate 8/3 x 48 = 128 (a multiple of 16)
        assert {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.q_proj"} <= names
        assert model.config.intermediate_size == 128
    ids = torch.randint(0, 64, (2, 16))
    assert model(input_ids=ids).logits.shape == (2, 16, 64)
