"""The on-disk kernel cache (primitives/kernel_cache.py) without a GPU: entries round-trip, racing
writers leave a whole entry, damaged entries are misses, the key follows the code and the
configuration, the environment switches it, and a real compile writes an entry that the next
lookup serves without compiling."""
import logging
import multiprocessing
import os

import numpy as np
import pytest

from numba_fa3.primitives import kernel_cache, launch, smem

SOURCES, TOOLS, CC = "s" * 64, {"numba-cuda": "x"}, (9, 0)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache directory, switched on, with warnings reset."""
    monkeypatch.setenv("NUMBA_FA3_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("NUMBA_FA3_CACHE", raising=False)
    monkeypatch.setattr(kernel_cache, "_warned", set())
    return tmp_path / "cache"


def _payload(rng, n=None):
    return rng.integers(0, 256, size=n or int(rng.integers(1, 5000)), dtype=np.uint8).tobytes()


class _Kernel(launch.HopperKernel):
    """A stand-in with the attributes a kernel class has (no Numba involved)."""
    SIGNATURE = "void(uint64)"
    KNOB = 1

    def __init__(self, width=4, scale=0.5):
        self.width, self.scale = width, scale
        self.threads = 128
        self.smem = smem.SharedLayout()
        self.smem.add("a", 1024 * width)
        self._memo = object()  # private state: not configuration


def _key(kernel, sources=SOURCES, tools=TOOLS, cc=CC):
    return _KERNEL_KEY(kernel, cc, sources=sources, tools=tools)


_KERNEL_KEY = kernel_cache.kernel_key


def _without_numba(monkeypatch, compile_cubin):
    """Key without asking Numba for versions, and compile with a stand-in."""
    monkeypatch.setattr(kernel_cache, "kernel_key", lambda k, cc: _key(k, cc=cc))
    monkeypatch.setattr(kernel_cache, "compile_cubin", compile_cubin)
    monkeypatch.setattr(_Kernel, "make_kernel", lambda self: None, raising=False)


def test_entry_round_trips_and_leaves_no_temporary(cache):
    rng = np.random.default_rng(1)
    for i in range(5):
        key, payload = f"key {i} {rng.random()}", _payload(rng)
        assert kernel_cache.load(key) is None
        assert kernel_cache.store(key, f"kernel_{i}", payload)
        assert kernel_cache.load(key) == (f"kernel_{i}", payload)
        assert kernel_cache.load(key + " other") is None
    assert len(os.listdir(cache)) == 5 and not [f for f in os.listdir(cache) if f.startswith(".tmp")]


def _race(directory, key, seed, rounds, payloads):
    """Store this process's payload `rounds` times; every read in between must be a whole entry."""
    os.environ["NUMBA_FA3_CACHE_DIR"] = directory
    for _ in range(rounds):
        assert kernel_cache.store(key, f"k{seed}", payloads[seed])
        name, got = kernel_cache.load(key)
        assert got == payloads[int(name[1:])]


def test_processes_racing_on_one_entry_leave_it_whole(cache):
    rng = np.random.default_rng(2)
    payloads = [_payload(rng, 200_000), _payload(rng, 150_000)]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_race, args=(str(cache), "shared key", i, 40, payloads)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    name, got = kernel_cache.load("shared key")
    assert got == payloads[int(name[1:])]
    assert os.listdir(cache) == [f for f in os.listdir(cache) if not f.startswith(".tmp")]


def test_damaged_entries_are_misses_and_are_rewritten(cache, monkeypatch):
    rng = np.random.default_rng(3)
    kernel = _Kernel()
    compiled = []

    def compile_cubin(fn, signature, threads, cc):
        compiled.append(1)
        return "kern", payload
    _without_numba(monkeypatch, compile_cubin)
    payload = _payload(rng, 3000)
    assert kernel_cache.cubin(kernel, CC) == ("kern", payload) and len(compiled) == 1
    (path,) = cache.iterdir()
    whole = path.read_bytes()
    cut = int(rng.integers(1, len(whole) - 1))
    flip = bytearray(whole)
    flip[int(rng.integers(len(whole) - len(payload), len(whole)))] ^= 0x40
    for damaged in (whole[:cut], bytes(flip), b"", b"\x7fELF" + whole[4:], whole + b"\0"):
        path.write_bytes(damaged)
        assert kernel_cache.load(_key(kernel)) is None
        assert kernel_cache.cubin(kernel, CC) == ("kern", payload)
        assert path.read_bytes() == whole
    assert len(compiled) == 6
    assert kernel_cache.cubin(kernel, CC) == ("kern", payload) and len(compiled) == 6


def test_key_follows_sources_configuration_and_toolchain():
    base = _key(_Kernel())
    assert _key(_Kernel()) == base                       # same configuration, new object
    other = _Kernel()
    other._memo = object()
    assert _key(other) == base                           # private state is not configuration
    assert _key(_Kernel(), sources="t" * 64) != base
    assert _key(_Kernel(), tools={"numba-cuda": "y"}) != base
    assert _key(_Kernel(), cc=(10, 0)) != base
    assert _key(_Kernel(width=8)) != base                # instance attribute (and smem size)
    assert _key(_Kernel(scale=0.25)) != base
    knob = type("Knob", (_Kernel,), {"KNOB": 2})         # a tuning experiment's subclass
    assert _key(knob()) != base
    assert _key(type("Knob", (_Kernel,), {"KNOB": 3})()) != _key(knob())
    clustered = _Kernel()
    clustered.cluster = 2
    assert _key(clustered) != base


def test_key_follows_functions_and_their_captures():
    """A configuration that holds functions (a partial, a closure) is keyed on what they carry."""
    import functools

    def make(scale):
        return lambda x: x * scale
    keys = []
    for fn in (functools.partial(max, 1), functools.partial(max, 2), make(1.0), make(2.0)):
        kern = _Kernel()
        kern.step = fn
        keys.append(_key(kern))
    assert len(set(keys)) == 4
    again = _Kernel()
    again.step = make(1.0)
    assert _key(again) == keys[2]
    opaque = _Kernel()
    opaque.handle = object()
    with pytest.raises(ValueError, match="cannot key"):
        _key(opaque)


def test_source_hash_covers_every_package_file(tmp_path, monkeypatch):
    dirs = []
    for pkg in kernel_cache.PACKAGES:
        (tmp_path / pkg / "sub").mkdir(parents=True)
        (tmp_path / pkg / "__init__.py").write_text("")
        (tmp_path / pkg / "sub" / "mod.py").write_text("X = 1\n")
        dirs.append(tmp_path / pkg)
    monkeypatch.setattr(kernel_cache, "_package_dirs", lambda: tuple(dirs))
    digests = []
    for edit in (None, "X = 2\n", "X = 1\n"):
        if edit:
            (dirs[-1] / "sub" / "mod.py").write_text(edit)
        kernel_cache.source_hash.cache_clear()
        digests.append(kernel_cache.source_hash())
    kernel_cache.source_hash.cache_clear()
    assert digests[0] != digests[1] and digests[0] == digests[2]


def test_source_hash_finds_this_library():
    names = {d.name for d in kernel_cache._package_dirs()}
    assert {name.rsplit(".", 1)[-1] for name in kernel_cache.PACKAGES} <= names
    assert len(kernel_cache.source_hash()) == 64


def test_location_and_switch_follow_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("NUMBA_FA3_CACHE_DIR", raising=False)
    monkeypatch.delenv("NUMBA_FA3_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kernel_cache.cache_dir() == tmp_path / "xdg" / "numba_fa3"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert kernel_cache.cache_dir() == tmp_path / "home" / ".cache" / "numba_fa3"
    monkeypatch.setenv("NUMBA_FA3_CACHE_DIR", str(tmp_path / "mine"))
    assert kernel_cache.cache_dir() == tmp_path / "mine"
    for off in ("0", "false", "OFF"):
        monkeypatch.setenv("NUMBA_FA3_CACHE", off)
        assert kernel_cache.cache_dir() is None
        assert not kernel_cache.store("k", "n", b"x") and kernel_cache.load("k") is None


def test_disabled_cache_compiles_every_time_and_writes_nothing(cache, monkeypatch):
    monkeypatch.setenv("NUMBA_FA3_CACHE", "0")
    calls = []
    _without_numba(monkeypatch, lambda *a: calls.append(a) or ("kern", b"cubin"))
    for _ in range(2):
        assert kernel_cache.cubin(_Kernel(), CC) == ("kern", b"cubin")
    assert len(calls) == 2 and not cache.exists()


def test_unwritable_directory_warns_once_and_carries_on(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("NUMBA_FA3_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(kernel_cache, "_warned", set())
    _without_numba(monkeypatch, lambda *a: ("kern", b"cubin"))
    with caplog.at_level(logging.WARNING, logger="numba_fa3"):
        for _ in range(3):
            assert kernel_cache.cubin(_Kernel(), CC) == ("kern", b"cubin")
    warnings = [r for r in caplog.records if r.name == "numba_fa3" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot write" in warnings[0].getMessage()


class _Tiny(launch.HopperKernel):
    """The smallest real kernel: stores its configured value, so a stale entry would be wrong."""
    from numba import types
    SIGNATURE = types.void(types.uint64, types.int32)

    def __init__(self, value):
        self.value, self.threads = value, 128
        self.smem = smem.SharedLayout()

    def make_kernel(self):
        from numba import cuda
        from numba_fa3.ptx_inline import memory
        value = self.value

        def tiny(out, n):
            i = cuda.threadIdx.x
            if i < n:
                memory.st_global_b32(out + 4 * i, value)
        return tiny


def test_compile_writes_an_entry_the_next_lookup_serves(cache, monkeypatch, caplog):
    """A real compile (Numba + nvJitLink, no GPU needed) for the assumed device: logged as slow,
    stored; the next lookup with a new object of the same configuration does not compile."""
    value = int(np.random.default_rng(4).integers(1, 2 ** 30))
    monkeypatch.setattr(kernel_cache, "SLOW_COMPILE_S", 0.0)
    with caplog.at_level(logging.INFO, logger="numba_fa3"):
        name, image = kernel_cache.cubin(_Tiny(value), CC)
    assert image[:4] == b"\x7fELF" and "tiny" in name
    assert any("compiling _Tiny(value=" in r.getMessage() and str(cache) in r.getMessage()
               for r in caplog.records)
    (entry,) = cache.iterdir()

    def no_compile(*args):
        raise AssertionError("compiled although the entry was there")
    monkeypatch.setattr(kernel_cache, "compile_cubin", no_compile)
    assert kernel_cache.cubin(_Tiny(value), CC) == (name, image)
    assert kernel_cache.load(kernel_cache.kernel_key(_Tiny(value), CC), "_Tiny") == (name, image)
    with pytest.raises(AssertionError, match="compiled although"):
        kernel_cache.cubin(_Tiny(value + 1), CC)  # another configuration is another entry


def test_precompile_lists_the_kernels_the_api_builds():
    from numba_fa3 import mask, tiles
    from numba_fa3.precompile import specializations
    specs = specializations([64, 128], ["bf16"], ["full", "causal"], softcap=False, varlen=True, gemm=True)
    assert len(specs) == len(set(specs))
    forward = [args for kind, args in specs if kind == "forward"]
    for d in (64, 128):
        for kind in (mask.MASK_NONE, mask.MASK_CAUSAL):
            assert ("bf16", d, kind, False, False, False) in forward      # flash_attn
            assert ("bf16", d, kind, False, True, False) in forward       # flash_attn_varlen
            long = tiles.has_long_tiles(d, kind != mask.MASK_NONE, tiles.LONG_QUERIES)
            assert (("bf16", d, kind, False, False, True) in forward) == long
    assert sorted(args for kind, args in specs if kind == "gemm") == sorted(
        ("bf16", out, tb) for out in ("bf16", "f32") for tb in (True, False))


def test_precompile_backward_flag_reaches_the_specializations():
    """`--backward` adds the backward's kernels (main once parsed it and dropped it)."""
    from numba_fa3.precompile import parser, specs_of
    with_bwd = {kind for kind, _ in specs_of(parser().parse_args(["--hdims", "192", "--backward"]))}
    without = {kind for kind, _ in specs_of(parser().parse_args(["--hdims", "192"]))}
    assert {"backward", "preprocess", "postprocess"} <= with_bwd
    assert without == {"forward"}
