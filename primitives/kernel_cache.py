"""Assembled kernels (cubins) kept on disk, so that a new process launches a kernel specialization
compiled before instead of compiling it again (Numba takes 5-30 s per specialization).

Where: `$NUMBA_FA3_CACHE_DIR`, else `$XDG_CACHE_HOME/numba_fa3`, else `~/.cache/numba_fa3`.
`NUMBA_FA3_CACHE=0` turns the cache off.

An entry's key is everything that changes the assembled code: the kernel's configuration (its class
and the plain values of its attributes, class attributes included: the tuning knobs are class
attributes that experiments override in subclasses), its signature, threads, shared memory and
cluster size; a hash of the library's sources (an edited kernel is never served stale) and of any
module outside them that defines a class of the kernel's; the versions of numba, numba-cuda,
llvmlite, NVVM and of what assembled the cubin (nvJitLink, or the driver where Numba links through
it); the device's compute capability.

Each entry is written to a temporary file in the cache directory and renamed into place, so
processes compiling the same kernel at once each leave a whole entry and a reader never sees a
partial one.  An entry carries a checksum; one that does not verify (truncated, corrupt, another
format) counts as a miss and is compiled and written again.

The compile needs no GPU: Numba compiles for the device it is told of, and nvJitLink assembles for
sm_90a on the CPU, so `python -m numba_fa3.precompile` can fill the cache on a build machine.
"""
import contextlib
import dataclasses
import enum
import functools
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import os
import pathlib
import struct
import sys
import tempfile
import threading
import time
import types as pytypes

log = logging.getLogger("numba_fa3")

#: The packages whose sources are the kernels' code (hashed into every key).
PACKAGES = ("numba_fa3", "numba_fa3.primitives", "numba_fa3.ptx_inline")
#: The device the cubins are for where no GPU is present (the only target of this library).
ASSUMED_CC = (9, 0)
#: A compile slower than this says so at INFO level (logger "numba_fa3").
SLOW_COMPILE_S = 1.0

_MAGIC = b"numba_fa3 cubin v1\n"
_HEADER = struct.Struct("<32sQQ")      # sha256(meta + payload), len(meta), len(payload)
_warned = set()


def cache_dir():
    """The cache directory (a Path, maybe not created yet), or None where NUMBA_FA3_CACHE turns
    the cache off."""
    if os.environ.get("NUMBA_FA3_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    explicit = os.environ.get("NUMBA_FA3_CACHE_DIR")
    if explicit:
        return pathlib.Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "numba_fa3"


def _warn_once(directory, what, exc):
    if str(directory) not in _warned:
        _warned.add(str(directory))
        log.warning("kernel cache: %s %s (%s); kernels are compiled in every process instead",
                    what, directory, exc)


# --- the key --------------------------------------------------------------------------------------

def _file_digest(paths):
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p).encode() + b"\0")
        h.update(pathlib.Path(p).read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _package_dirs():
    """The directories of PACKAGES as Python finds them (a source checkout or site-packages;
    found by name, so the hash follows the packages wherever they are installed)."""
    dirs = []
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            dirs += [pathlib.Path(p).resolve() for p in spec.submodule_search_locations]
    return tuple(dirs)


@functools.lru_cache(maxsize=None)
def source_hash():
    """sha256 of every .py file of PACKAGES, each named by its path below its package's parent:
    computed once per process (a few ms)."""
    files = {}
    for d in _package_dirs():
        for p in d.rglob("*.py"):
            if "__pycache__" not in p.parts:
                files.setdefault(p.resolve(), p.relative_to(d.parent).as_posix())
    h = hashlib.sha256()
    for path, name in sorted(files.items(), key=lambda item: item[1]):
        h.update(name.encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def _outside_source_hash(module_name):
    """sha256 of the source file of a module outside PACKAGES that defines a kernel subclass
    (a benchmark's or a test's); None where it has no file (built in a REPL) or is in PACKAGES."""
    path = getattr(sys.modules.get(module_name), "__file__", None)
    if not path:
        return None
    path = pathlib.Path(path).resolve()
    if any(d in path.parents for d in _package_dirs()):
        return None  # in source_hash already
    return _file_digest([path])


def _dist_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _loaded_library(libname):
    """(file name, size) of the shared library Numba loads for libname: NVVM and nvJitLink report
    only major.minor, and a system or conda install has no pip version to read."""
    try:
        from cuda import pathfinder
        path = pathfinder.load_nvidia_dynamic_lib(libname).abs_path
        return [os.path.basename(path), os.stat(path).st_size]
    except Exception:  # noqa: BLE001 - the version numbers still count
        return None


@functools.lru_cache(maxsize=None)
def toolchain():
    """Versions of everything between the Python source and the cubin (computed once)."""
    from numba.cuda.core import config
    from numba.cuda.cudadrv import driver, nvvm
    lib = nvvm.NVVM()
    parts = {
        "numba": _dist_version("numba"), "numba-cuda": _dist_version("numba-cuda"),
        "llvmlite": _dist_version("llvmlite"),
        # Numba's settings that change the code of a kernel compiled with its defaults.
        "numba-config": [int(config.OPT), bool(config.CUDA_DEBUGINFO_DEFAULT), str(config.FORCE_CUDA_CC)],
        "nvvm": [list(lib.get_version()), list(lib.get_ir_version()), _dist_version("nvidia-nvvm"),
                 _loaded_library("nvvm")],
    }
    if driver._have_nvjitlink():
        from cuda.bindings import nvjitlink
        parts["assembler"] = ["nvJitLink", list(nvjitlink.version()), _dist_version("nvidia-nvjitlink"),
                              _loaded_library("nvJitLink")]
    else:  # Numba links through the driver's JIT linker: its version assembles the cubin
        from cuda.bindings import driver as drv
        parts["assembler"] = ["driver", drv.cuDriverGetVersion()[1]]
    return parts


def canonical(value, _depth=0):
    """A JSON-able, address-free rendering of a configuration value: plain values as themselves,
    enums by name and value, dataclasses and plain objects by their public fields, containers
    element by element, functions by qualified name and what their closures captured, classes
    by qualified name (code is in the source hash).  Raises ValueError for a value it cannot
    render without an address (the kernel is then compiled without the cache)."""
    if _depth > 8:
        raise ValueError("configuration nested too deeply to key a kernel on")
    rec = functools.partial(canonical, _depth=_depth + 1)
    if isinstance(value, enum.Enum):
        return ["enum", _qualname(type(value)), value.name, rec(value.value)]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return ["float", value.hex()]
    if isinstance(value, bytes):
        return ["bytes", value.hex()]
    if isinstance(value, functools.partial):
        return ["partial", rec(value.func), rec(value.args), rec(value.keywords)]
    if hasattr(value, "py_func"):  # a Numba dispatcher: its Python function
        return rec(value.py_func)
    if isinstance(value, pytypes.FunctionType):  # by name, and what its closure captured
        cells = [c.cell_contents for c in (value.__closure__ or ()) if _cell_filled(c)]
        return ["function", _qualname(value), rec(value.__defaults__), rec(tuple(cells))]
    if type(value).__module__.split(".")[0] in ("numba", "numpy"):
        return [_qualname(type(value)), str(value)]   # types, signatures, dtypes, scalars
    if isinstance(value, (tuple, list)):
        return [type(value).__name__] + [rec(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return ["set"] + sorted((rec(v) for v in value), key=json.dumps)
    if isinstance(value, dict):
        return ["dict"] + sorted(([rec(k), rec(v)] for k, v in value.items()), key=json.dumps)
    if isinstance(value, type) or callable(value) or isinstance(value, pytypes.ModuleType):
        return ["code", _qualname(value)]
    if dataclasses.is_dataclass(value):
        return ["dataclass", _qualname(type(value))] + [
            [f.name, rec(getattr(value, f.name))] for f in dataclasses.fields(value)]
    if hasattr(value, "__dict__"):
        return ["object", _qualname(type(value))] + [
            [k, rec(v)] for k, v in sorted(vars(value).items()) if not k.startswith("_")]
    text = str(value)
    if " at 0x" in text:
        raise ValueError(f"cannot key a kernel on {type(value).__name__} {text}")
    return [_qualname(type(value)), text]


def _cell_filled(cell):
    try:
        cell.cell_contents
    except ValueError:  # a cell not yet assigned
        return False
    return True


def _qualname(obj):
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


def configuration(kernel):
    """The kernel object's compile-time configuration: its class, every public plain attribute of
    the instance and of the classes it derives from (instance values win), and the source hash
    of each defining module outside PACKAGES.  Methods, properties and private (cached) state are
    left out."""
    attrs, classes = {}, []
    for cls in reversed(type(kernel).__mro__[:-1]):  # base classes first, so subclasses override
        classes.append([_qualname(cls), _outside_source_hash(cls.__module__)])
        for name, v in vars(cls).items():
            if name.startswith("_") or isinstance(v, (pytypes.FunctionType, staticmethod, classmethod,
                                                      property, functools.cached_property)):
                continue
            attrs[name] = v
    attrs.update((k, v) for k, v in vars(kernel).items() if not k.startswith("_"))
    return {"classes": classes, "attributes": canonical(attrs)}


def kernel_key(kernel, cc, sources=None, tools=None):
    """The cache key of a HopperKernel-like object (`SIGNATURE`, `threads`, `smem.bytes`,
    `cluster` and its configuration) for a device of compute capability cc, as text."""
    parts = {
        "configuration": configuration(kernel),
        "signature": str(kernel.SIGNATURE), "threads": kernel.threads,
        "smem_bytes": kernel.smem.bytes, "cluster": getattr(kernel, "cluster", 1),
        "sources": source_hash() if sources is None else sources,
        "toolchain": toolchain() if tools is None else tools,
        "cc": list(cc), "format": _MAGIC.decode().strip(),
    }
    return json.dumps(parts, sort_keys=True, separators=(",", ":"))


def _entry_path(directory, key, label):
    digest = hashlib.sha256(key.encode()).hexdigest()[:40]
    safe = "".join(c if c.isalnum() or c in "_-" else "_" for c in label)[:60]
    return pathlib.Path(directory) / f"{safe}-{digest}.cubin-entry"


# --- entries on disk ------------------------------------------------------------------------------

def _encode(key, name, payload):
    meta = json.dumps({"key": key, "name": name}).encode()
    digest = hashlib.sha256(meta + payload).digest()
    return _MAGIC + _HEADER.pack(digest, len(meta), len(payload)) + meta + payload


def _decode(blob, key):
    """(name, payload) of an entry's bytes, or None unless whole, verified and for `key`."""
    head = len(_MAGIC) + _HEADER.size
    if len(blob) < head or not blob.startswith(_MAGIC):
        return None
    digest, n_meta, n_payload = _HEADER.unpack_from(blob, len(_MAGIC))
    if len(blob) != head + n_meta + n_payload:
        return None
    body = blob[head:]
    if hashlib.sha256(body).digest() != digest:
        return None
    try:
        meta = json.loads(body[:n_meta])
    except ValueError:
        return None
    if meta.get("key") != key or not isinstance(meta.get("name"), str):
        return None  # a hash collision of the file name, or an entry moved by hand
    return meta["name"], bytes(body[n_meta:])


def load(key, label="kernel", directory=None):
    """(kernel name, cubin bytes) stored under key, or None: no cache, no entry, or an entry that
    does not verify."""
    directory = cache_dir() if directory is None else directory
    if directory is None:
        return None
    path = _entry_path(directory, key, label)
    try:
        blob = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        _warn_once(directory, "cannot read", e)
        return None
    entry = _decode(blob, key)
    if entry is None:
        log.debug("kernel cache: %s does not verify; compiling again", path)
    return entry


def store(key, name, payload, label="kernel", directory=None):
    """Write an entry (temporary file, then rename).  False where the cache is off or not
    writable (warned once per process)."""
    directory = cache_dir() if directory is None else directory
    if directory is None:
        return False
    path = _entry_path(directory, key, label)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".cubin-entry")
        with os.fdopen(fd, "wb") as f:
            f.write(_encode(key, name, payload))
        os.replace(tmp, path)
        return True
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        _warn_once(directory, "cannot write to", e)
        return False


# --- compiling ------------------------------------------------------------------------------------

def _have_driver():
    from .compile import _have_driver as have
    return have()


def device_cc():
    """The current device's compute capability, or ASSUMED_CC where there is no GPU."""
    if not _have_driver():
        return ASSUMED_CC
    from numba import cuda
    return tuple(cuda.get_current_device().compute_capability)


@contextlib.contextmanager
def _assume_device(cc):
    """Where there is no GPU, tell Numba the current device is one of compute capability cc
    (2-tuple, as a real device reports it, so the code and its mangled names are those a GPU
    would get) for the length of a compile."""
    if _have_driver():
        yield
        return
    from numba.cuda import dispatcher
    from numba.cuda.cudadrv import devices
    from types import SimpleNamespace
    device = SimpleNamespace(compute_capability=tuple(cc), id=0)
    real = dispatcher.get_current_device, devices.get_context
    dispatcher.get_current_device = lambda: device
    devices.get_context = lambda devnum=None: SimpleNamespace(device=device)
    try:
        yield
    finally:
        dispatcher.get_current_device, devices.get_context = real


def compile_cubin(fn, signature, threads, cc):
    """(entry name, cubin bytes) of kernel fn, compiled as `cuda.jit(signature,
    launch_bounds=(threads, 1))` compiles it (Numba's defaults: LTO through nvJitLink where
    present), without loading it into a context."""
    from numba import cuda
    from numba.cuda.dispatcher import _Kernel
    with _assume_device(cc):
        dispatcher = cuda.jit(launch_bounds=(threads, 1))(fn)
        kernel = _Kernel(dispatcher.py_func, signature.args, **dispatcher.targetoptions)
        lib = kernel._codelibrary
        if lib._setup_functions or lib._teardown_functions or lib.referenced_objects:
            raise RuntimeError(f"{kernel.entry_name} needs Numba's module setup or refers to arrays of "
                               "this process: a kernel of this library takes only scalars")
        image = lib.get_cubin()
    return kernel.entry_name, bytes(getattr(image, "code", image))


def describe(kernel):
    """A short label of a kernel object for logs: the class and the constructor's plain arguments
    kept as attributes of the same name."""
    try:
        names = list(inspect.signature(type(kernel).__init__).parameters)[1:]
    except (TypeError, ValueError):
        names = []
    args = [f"{n}={getattr(kernel, n)!r}" for n in names
            if isinstance(getattr(kernel, n, None), (bool, int, float, str))]
    return f"{type(kernel).__name__}({', '.join(args)})"


def cubin(kernel, cc=None):
    """(entry name, cubin bytes) of a HopperKernel-like object for compute capability cc (the
    current device's by default): from the cache where there, else compiled and stored."""
    cc = device_cc() if cc is None else tuple(cc)
    directory = cache_dir()
    label = type(kernel).__name__
    key = None
    if directory is not None:
        try:
            key = kernel_key(kernel, cc)
        except ValueError as e:  # a configuration value with no stable rendering: never guess
            log.debug("kernel cache: %s not cached (%s)", type(kernel).__name__, e)
    if key is not None:
        entry = load(key, label, directory)
        if entry is not None:
            return entry
    what = describe(kernel)
    where = f"cached afterwards in {directory}" if directory is not None else "NUMBA_FA3_CACHE=0: not cached"
    # Said while the compile runs, only if it is a slow one.
    timer = threading.Timer(SLOW_COMPILE_S, log.info, ("compiling %s (first use; %s)", what, where))
    timer.daemon = True
    start = time.perf_counter()
    timer.start()
    try:
        name, payload = compile_cubin(kernel.make_kernel(), kernel.SIGNATURE, kernel.threads, cc)
    finally:
        timer.cancel()
    log.debug("compiled %s in %.1f s", what, time.perf_counter() - start)
    if key is not None:
        store(key, name, payload, label, directory)
    return name, payload
