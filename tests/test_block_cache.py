"""The CPU block cache of the curvature sweep (csrc/generic/block_cache.cpp)."""

import os
import threading
import time

import pytest
import torch
import torch.nn as nn

import obd_ext
from obd_ext.block_cache import block_cache_stats, cpu_block_cache
from obd_ext.models import GPT

MIB = 1 << 20


def floats(mib: float) -> int:
    return int(mib * MIB) // 4


@pytest.fixture(autouse=True)
def cache_enabled(monkeypatch):
    monkeypatch.delenv("OBD_EXT_DISABLE_BLOCK_CACHE", raising=False)
    assert block_cache_stats()["depth"] == 0
    yield
    assert block_cache_stats()["depth"] == 0


def test_freed_block_is_reused_for_the_same_size():
    with cpu_block_cache():
        a = torch.empty(floats(2))
        ptr = a.data_ptr()
        del a
        assert block_cache_stats()["cached_bytes"] == 2 * MIB
        before = block_cache_stats()
        b = torch.ones(floats(2))
        after = block_cache_stats()
        assert b.data_ptr() == ptr
        assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"]
        assert after["cached_bytes"] == 0
        assert torch.all(b == 1)  # reused memory is written like fresh memory
        c = torch.empty(floats(3))  # another size: not served from a 2 MiB block
        assert c.data_ptr() != ptr


def test_small_requests_and_closed_scopes_bypass_the_cache():
    before = block_cache_stats()
    with cpu_block_cache():
        for _ in range(5):
            torch.empty(1000)  # 4 kB: left to the system allocator
    big = torch.empty(floats(2))  # no scope open
    del big
    after = block_cache_stats()
    assert (after["hits"], after["misses"], after["cached_bytes"]) == (before["hits"], before["misses"], 0)


def test_closing_the_scope_releases_everything_and_late_frees_go_back():
    with cpu_block_cache():
        keep = torch.empty(floats(8))  # outlives the scope
        for mib in (1, 2, 3):
            torch.empty(floats(mib))  # freed at once: cached (within the footprint rule's slack)
        assert block_cache_stats()["cached_bytes"] == 6 * MIB
        assert block_cache_stats()["live_bytes"] >= 8 * MIB
    assert block_cache_stats()["cached_bytes"] == 0
    live = block_cache_stats()["live_bytes"]
    del keep  # freed after its scope: straight back to the system allocator
    s = block_cache_stats()
    assert s["cached_bytes"] == 0 and s["live_bytes"] == live - 8 * MIB


def test_nested_scopes_release_at_the_outermost():
    with cpu_block_cache():
        with cpu_block_cache():
            assert block_cache_stats()["depth"] == 2
            torch.empty(floats(2))
        assert block_cache_stats()["depth"] == 1
        assert block_cache_stats()["cached_bytes"] == 2 * MIB  # the inner exit kept it
    assert block_cache_stats()["cached_bytes"] == 0


def test_exit_without_enter_is_an_error():
    with pytest.raises(RuntimeError, match="never opened"):
        torch.ops.obd_ext._block_cache_exit()


def test_env_var_turns_it_off(monkeypatch):
    monkeypatch.setenv("OBD_EXT_DISABLE_BLOCK_CACHE", "1")
    with cpu_block_cache():
        assert block_cache_stats()["depth"] == 0
        torch.empty(floats(2))
        assert block_cache_stats()["cached_bytes"] == 0


def test_footprint_stays_within_the_slack_of_the_high_water_mark():
    """A miss gives cached blocks back so that live + cached <= 1.5 x the scope's peak of live bytes."""
    g = torch.Generator().manual_seed(0)
    with cpu_block_cache():
        live = []
        for step in range(300):
            mib = 1 + int(torch.randint(0, 12, (1,), generator=g))
            if live and torch.rand(1, generator=g).item() < 0.5:
                live.pop(int(torch.randint(0, len(live), (1,), generator=g)))
            else:
                live.append(torch.empty(floats(mib)))
            s = block_cache_stats()
            assert s["live_bytes"] <= s["high_water_bytes"]
            assert s["live_bytes"] + s["cached_bytes"] <= s["high_water_bytes"] * 3 // 2, step
        assert block_cache_stats()["hits"] > 0


def test_raw_allocations_of_kernels_go_through_it():
    """CPU kernels take scratch memory with raw_allocate / raw_deallocate (GELU does):
    both small and large requests must come back through the right deleter."""
    x = torch.randn(2048, 1024)
    want = torch.nn.functional.gelu(x)
    with cpu_block_cache():
        for _ in range(3):
            assert torch.equal(torch.nn.functional.gelu(x), want)
            assert torch.equal(torch.nn.functional.gelu(x[:8]), want[:8])


def test_threads_allocating_at_once_keep_their_data():
    errors = []

    def work(seed):
        try:
            for i in range(40):
                t = torch.full((floats(1 + (seed + i) % 4),), float(seed))
                if not torch.all(t == seed):
                    errors.append(seed)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    with cpu_block_cache():
        threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_inside_a_scope_starts_without_one():
    with cpu_block_cache():
        torch.empty(floats(2))  # something cached in the parent
        pid = os.fork()
        if pid == 0:  # the child: no open scope, nothing cached, allocations work
            torch.set_num_threads(1)  # as DataLoader workers do: OpenMP's pool does not survive a fork
            ok = block_cache_stats()["depth"] == 0 and block_cache_stats()["cached_bytes"] == 0
            t = torch.ones(floats(3))
            del t
            ok = ok and block_cache_stats()["cached_bytes"] == 0
            os._exit(0 if ok else 1)
        deadline = time.monotonic() + 60
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if done[0] == 0:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        status = done[1]
        assert block_cache_stats()["depth"] == 1 and block_cache_stats()["cached_bytes"] == 2 * MIB
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("method", ["obd", "lm", "fisher"])
def test_curvature_is_the_same_with_and_without_the_cache(monkeypatch, method):
    torch.manual_seed(0)
    model = GPT(vocab=2048, d=64, layers=2, heads=4, seq=128)  # logits and scores of 1 MiB or more
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 2048, (4, 128), generator=g), torch.randint(0, 2048, (512,), generator=g))
            for _ in range(3)]
    loss = nn.CrossEntropyLoss()
    before = block_cache_stats()
    with_cache = obd_ext.hessian_diag(model, loss, data, method=method, progress=False)
    hits = block_cache_stats()["hits"] - before["hits"]
    monkeypatch.setenv("OBD_EXT_DISABLE_BLOCK_CACHE", "1")
    without = obd_ext.hessian_diag(model, loss, data, method=method, progress=False)
    assert hits > 0  # the batches did reuse blocks
    for k in without:
        assert torch.equal(with_cache[k], without[k]), k


def test_out_of_memory_gives_the_cached_blocks_back_first():
    with cpu_block_cache():
        torch.empty(floats(2))
        assert block_cache_stats()["cached_bytes"] == 2 * MIB
        with pytest.raises(RuntimeError):
            torch.empty(1 << 60, dtype=torch.uint8)  # no machine has this: the retry fails as well
        assert block_cache_stats()["cached_bytes"] == 0  # given back before the retry
        t = torch.ones(floats(2))  # and the scope goes on working
        assert torch.all(t == 1)
