"""The fused chain's native library is only loaded when this code built it into a private
cache (issue 14 item 7, issue 16): a planted library never runs, an unsafe cache is refused
with a warning, the C call's guards survive `python -O`, and ranks on one node build once."""

import fcntl
import hashlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys

import pytest
import torch

from seqshard.ops.delta_rule import chunk, fused_chain, native_cache
from tests.common import assert_close
from tests.harness import run_ranks
from tests.test_delta_rule import make_inputs

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None,
                                reason="no C compiler: the torch loop is the only chain here")

PLANTED = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void)
{
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("the planted library ran\n", f); fclose(f); }
}
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh private cache, and no library loaded yet, so each test really builds/loads."""
    path = tmp_path / "cache"
    monkeypatch.setenv("SEQSHARD_CACHE", str(path))
    monkeypatch.setenv("SEQSHARD_FUSED_CHAIN", "1")
    monkeypatch.setattr(fused_chain, "_libs", {})
    return path


def _library_name(tmp_path, monkeypatch) -> str:
    """The file name the float library gets here, from a build in a separate cache."""
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setenv("SEQSHARD_CACHE", str(elsewhere))
    assert fused_chain.available(torch.float32)
    [lib] = elsewhere.glob("fused_chain_float_*.so")
    monkeypatch.setenv("SEQSHARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fused_chain, "_libs", {})
    return lib.name


def _chain_matches_torch_loop(monkeypatch, seed=31):
    """chunk.chain_states with whatever fused_chain loads equals the torch loop's."""
    t = make_inputs(1, 2, 21, 8, 12, gate=True, h0=True, seed=seed)
    inputs = [t[n].detach() if n in t else None for n in ("q", "k", "v", "beta", "gate")]
    ch = chunk.prepare_blocked(inputs, 8 ** -0.5, 4)
    s0 = t["initial_state"].detach()
    native = chunk.chain_states(s0, ch)
    monkeypatch.setenv("SEQSHARD_FUSED_CHAIN", "0")
    loop = chunk.chain_states(s0, ch)
    monkeypatch.setenv("SEQSHARD_FUSED_CHAIN", "1")
    for name, ref, out in zip(("states", "deltas", "final state"), loop, native):
        assert_close(f"chain {name}", ref, out, 1e-5)


@pytest.mark.parametrize("record", ["none", "wrong hash"])
def test_planted_library_is_never_loaded(record, cache, tmp_path, monkeypatch):
    """A library at the expected path that this code did not build (no recorded hash, or a
    record that does not match it) is rebuilt, never dlopen'ed: its constructor never runs."""
    name = _library_name(tmp_path, monkeypatch)
    marker = tmp_path / "planted_ran"
    source = tmp_path / "planted.c"
    source.write_text(PLANTED)
    cache.mkdir(mode=0o700)
    subprocess.run(["cc", "-shared", "-fPIC", f'-DMARKER="{marker}"', str(source), "-o",
                    str(cache / name)], check=True)
    os.chmod(cache / name, 0o700)  # owner-only like a real build: only the hash can tell
    if record == "wrong hash":
        (cache / f"{name}.sha256").write_text("0" * 64 + f"  {name}\n")
        os.chmod(cache / f"{name}.sha256", 0o600)
    try:
        _chain_matches_torch_loop(monkeypatch)
        assert fused_chain._libs[torch.float32] is not None, "the rebuilt library did not load"
    finally:
        assert not marker.exists(), "the planted library was loaded"


def _refusal(cache, how, tmp_path):
    """Make the cache (or its library) unsafe in way `how`; returns the path named."""
    if how == "group-writable cache":
        cache.mkdir(mode=0o700)
        os.chmod(cache, 0o770)
        return cache
    if how == "symlinked cache":
        real = tmp_path / "real"
        real.mkdir(mode=0o700)
        cache.symlink_to(real)
        return cache
    if how == "cache of another user":
        if os.getuid() != 0:
            pytest.skip("only root can hand a folder to another user")
        try:
            nobody = pwd.getpwnam("nobody").pw_uid
        except KeyError:
            pytest.skip("no user 'nobody' here")
        cache.mkdir(mode=0o700)
        os.chown(cache, nobody, -1)
        return cache
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["group-writable cache", "symlinked cache",
                                 "cache of another user"])
def test_unsafe_cache_is_refused(how, cache, tmp_path, monkeypatch):
    """An unsafe cache: one RuntimeWarning naming it, nothing loaded, the torch loop's result."""
    path = _refusal(cache, how, tmp_path)
    with pytest.warns(RuntimeWarning, match=f"refus.*{path}") as caught:
        _chain_matches_torch_loop(monkeypatch)
        _chain_matches_torch_loop(monkeypatch, seed=32)  # no second warning
    assert len([w for w in caught if "refus" in str(w.message)]) == 1
    assert fused_chain._libs[torch.float32] is None
    assert not list(cache.glob("*.so")) and not (cache.resolve() / "build.lock").exists()


def test_group_writable_library_is_refused(cache, tmp_path, monkeypatch):
    """A genuine build (hash recorded) that anyone in the group could since have rewritten."""
    assert fused_chain.available(torch.float32)
    [lib] = cache.glob("fused_chain_float_*.so")
    os.chmod(lib, 0o770)
    monkeypatch.setattr(fused_chain, "_libs", {})
    with pytest.warns(RuntimeWarning, match=f"refus.*{lib}.*writable"):
        _chain_matches_torch_loop(monkeypatch)
    assert fused_chain._libs[torch.float32] is None


def test_cache_is_created_private(cache, monkeypatch):
    """The cache and the parents it creates are 0700; the library and its record owner-only."""
    nested = cache / "a" / "b"
    monkeypatch.setenv("SEQSHARD_CACHE", str(nested))
    assert fused_chain.available(torch.float32)
    for d in (cache, cache / "a", nested):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    [lib] = nested.glob("fused_chain_float_*.so")
    record = nested / f"{lib.name}.sha256"
    for f in (lib, record):
        assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f
    assert record.read_text().split()[0] == hashlib.sha256(lib.read_bytes()).hexdigest()
    assert sorted(p.name for p in nested.iterdir()) == sorted(
        [lib.name, record.name, "build.lock"])  # no temporary left behind


def test_compiler_version_is_part_of_the_key(cache, tmp_path, monkeypatch):
    """The same $CC reporting another version builds (and loads) another library."""
    wrapper = tmp_path / "cc-wrapper"
    real = shutil.which("cc")

    def version(v):
        wrapper.write_text(f'#!/bin/sh\n[ "$1" = --version ] && {{ echo "wrapped cc {v}"; '
                           f'exit 0; }}\nexec {real} "$@"\n')
        wrapper.chmod(0o755)

    monkeypatch.setenv("CC", str(wrapper))
    version(1)
    assert fused_chain.available(torch.float64)
    version(2)
    monkeypatch.setattr(fused_chain, "_libs", {})
    assert fused_chain.available(torch.float64)
    assert len(list(cache.glob("fused_chain_double_*.so"))) == 2


GUARDS = r"""
import json, sys, torch
from seqshard.ops.delta_rule import fused_chain as fc
assert fc.available(torch.float32)
nc, BH, C, Dk, Dv = 2, 3, 4, 8, 8
w, kt, u = torch.zeros(nc, BH, C, Dk), torch.zeros(nc, BH, C, Dk), torch.zeros(nc, BH, C, Dv)
states, deltas = torch.zeros(nc + 1, BH, Dk, Dv), torch.zeros(nc, BH, C, Dv)
cases = {
    "states not contiguous": lambda: fc.chain_forward(states.mT, deltas, w, u, kt, None),
    "deltas too small": lambda: fc.chain_forward(states, deltas[:1], w, u, kt, None),
    "kt of another shape": lambda: fc.chain_forward(states, deltas, w, u, kt[:, :1], None),
    "decay of another shape": lambda: fc.chain_forward(states, deltas, w, u, kt,
                                                       torch.zeros(nc, 1)),
    "g too small": lambda: fc.chain_backward(torch.zeros(BH, Dk, 1), w, kt, None,
                                             torch.zeros(nc, BH, Dk, Dv), None),
    "m too small": lambda: fc.chain_map(torch.zeros(BH, Dk, Dk), w, u, kt, None),
}
out = {}
for name, call in cases.items():
    try:
        call()
        out[name] = "no error"
    except Exception as e:
        out[name] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def test_guards_before_the_c_call_survive_python_O(cache):
    """Shape and stride checks before the C call raise ValueError even where `python -O`
    strips asserts (an assert there would let bad strides reach the C loop)."""
    assert fused_chain.available(torch.float32)  # the subprocess loads it, no compile
    done = subprocess.run([sys.executable, "-O", "-c", GUARDS], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ), cwd=os.path.dirname(__file__))
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name, result in results.items():
        assert result.startswith("ValueError: fused chain:"), f"{name}: {result}"


def _build_on_every_rank(rank, world, cache, wrapper):
    """Every rank loads the double library from one empty cache at once."""
    import torch.distributed as dist

    saved = {k: os.environ.get(k) for k in ("SEQSHARD_CACHE", "CC", "SEQSHARD_FUSED_CHAIN")}
    libs, fused_chain._libs = fused_chain._libs, {}
    os.environ.update(SEQSHARD_CACHE=cache, CC=wrapper, SEQSHARD_FUSED_CHAIN="1")
    try:
        dist.barrier()
        return fused_chain.available(torch.float64)
    finally:
        fused_chain._libs = libs
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_ranks_on_one_node_build_once(cache, tmp_path):
    """Two ranks start on an empty cache together: one compiles, the other waits on the lock
    and loads the verified result."""
    log, wrapper = tmp_path / "compiles", tmp_path / "cc-logging"
    real = shutil.which("cc")
    wrapper.write_text(f'#!/bin/sh\n[ "$1" = --version ] || echo $PPID >> {log}\n'
                       f'exec {real} "$@"\n')
    wrapper.chmod(0o755)
    assert run_ranks(_build_on_every_rank, 2, str(cache), str(wrapper)) == [True, True]
    compilers = set(log.read_text().split())
    assert len(compilers) == 1, f"{len(compilers)} processes compiled"


def test_a_build_held_past_the_budget_falls_back(cache, monkeypatch):
    """Another process holding the build lock past COMPILE_TIMEOUT_S + LOCK_SLACK_S: one
    warning and the torch loop, never a wait the collective timeout would catch first."""
    monkeypatch.setattr(native_cache, "COMPILE_TIMEOUT_S", 1.0)
    monkeypatch.setattr(native_cache, "LOCK_SLACK_S", 0.0)
    cache.mkdir(mode=0o700)
    fd = os.open(cache / native_cache.LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.warns(RuntimeWarning, match="held .*build.lock"):
            _chain_matches_torch_loop(monkeypatch)
    finally:
        os.close(fd)
    assert fused_chain._libs[torch.float32] is None
