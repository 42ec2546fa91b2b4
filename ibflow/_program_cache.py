"""Traced programs kept on disk between processes (`jax.export`).

JAX's persistent compilation cache lets a later process skip XLA's compilation of a program it
has compiled before, but not the tracing and lowering that produce the program (1.9-2.3 s for
the Azulay Fig. 7.1 sweep's chunk on 2 cores, more than the compilation left to do). The
command line therefore also keeps each traced program (`compile_program`: a sweep's chunk
program, `ibflow run`'s flows), serialised with `jax.export` (StableHLO, no Python),
together with the structure of its outputs, and a later command of the same configuration and
shapes deserialises it instead of tracing again; its compilation then comes from the
compilation cache. Library users turn both on with `enable_compilation_cache`. Measured
(2 cores, both caches filled by a first command): `ibflow sweep --certify` of the Fig. 7.1 grid
on new data, 0.5-0.6 s from the end of the imports to the lowered chunk program against
1.9-2.3 s, whole command 5.4-7.1 s against 7.1-9.3 s (4 interleaved pairs); `ibflow run
--certify` at d = 1000, the flow 0.73-0.93 s against 1.64-2.12 s, whole command 3.7-5.0 s
against 4.9-5.9 s (4 interleaved pairs).

A program is found again only under a key of everything its trace depends on: the command's
configuration (network, options, solver), the arguments' shapes, dtypes and shardings, the JAX
settings that change a trace (x64, default matmul precision), the devices, and a fingerprint of
ibflow's source files and of the versions of JAX, jaxlib, Equinox, diffrax, lineax, optimistix,
optax and NumPy: a program traced by other code is never reused. A configuration whose text
names an object by its address (`<function f at 0x...>`) is never kept, since another process
may give another object the same address. The output structure is stored with `pickle`: the
directory is trusted as JAX's compilation cache is. Any failure to read or write the directory
only costs the speed-up.
"""

import functools
import hashlib
import os
import pickle
import tempfile
from importlib import metadata

import equinox as eqx
import jax

_directory: str | None = None  #: set by `enable_compilation_cache` (the command line calls it); None: off
#: Programs kept at most (~80 KB each for the Fig. 7.1 sweep's chunk); the least recently used go.
MAX_PROGRAMS = 256


def set_directory(path: str | None) -> None:
    """Keep traced programs under `path` (None: do not)."""
    global _directory
    _directory = path


#: Compilations shorter than this are not written to the persistent cache (the many tiny ones).
CACHE_MIN_COMPILE_SECONDS = 0.2


def default_cache_dir() -> str | None:
    """The cache directory of the command line and of `enable_compilation_cache()`:
    `$IBFLOW_CACHE_DIR`, default `$XDG_CACHE_HOME/ibflow/jax` (`~/.cache/ibflow/jax`); None
    when `IBFLOW_CACHE_DIR` is `off` (or empty, `0`, `none`)."""
    path = os.environ.get("IBFLOW_CACHE_DIR")
    if path is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "ibflow", "jax")
    return None if path.strip().lower() in ("", "off", "0", "none") else path


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str | None:
    """Keep compiled and traced programs on disk, as the `ibflow` command line does, so that a
    later process that solves problems of the same shapes (any values) skips XLA's compilation
    and ibflow's tracing of its sweep chunks and flows.

    Sets JAX's persistent compilation cache (`jax_compilation_cache_dir`, programs compiling in
    ≥ 0.2 s) to `path` and keeps traced programs in `path/programs` (`jax.export`, keyed on the
    configuration, shapes, devices and a fingerprint of ibflow's source and its libraries'
    versions; module docstring). `path=None`: `default_cache_dir()`, which honours
    `IBFLOW_CACHE_DIR=off`. Returns the directory in use, or None when off (JAX's settings are
    then left alone). JAX keys compiled programs on the program, the compiler options, jaxlib and
    the device; data values are arguments, not constants, in the sweep's, flows' and
    certificates' programs, so new data of the same shapes hits. An unwritable directory only
    costs the speed-up: JAX warns and compiles as usual. Opt-in: `import ibflow` never changes
    JAX's cache settings, which are process-wide. Measured on the 2-core CPU (fifteenth
    session): a certified in-process `sweep` of the Fig. 7.1 grid (d = 1000, N = 100, 100
    points) took 4.5 s in a later process against 9.3-10.2 s without the caches (the run that
    filled them: 10.5 s); on an H200 the grid command line took 6.4 s warm against 16.3 s cold."""
    path = default_cache_dir() if path is None else os.fspath(path)
    set_directory(None if path is None else os.path.join(path, "programs"))
    if path is not None:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECONDS)
    return path


@functools.cache
def source_fingerprint() -> str:
    """Hash of ibflow's source files and of the versions of the libraries that shape a trace."""
    h = hashlib.sha256()
    package = os.path.dirname(__file__)
    for name in sorted(os.listdir(package)):
        if name.endswith(".py"):
            with open(os.path.join(package, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read() + b"\0")
    for dist in ("jax", "jaxlib", "equinox", "diffrax", "lineax", "optimistix", "optax", "numpy"):
        try:
            h.update(f"{dist}={metadata.version(dist)};".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{dist}=?;".encode())
    return h.hexdigest()


def program_path(config: str, args) -> str | None:
    """The file of the program traced for `config` (a text naming the program's configuration)
    and `args` (arrays), or None when programs are not kept or `config` names an address."""
    if _directory is None or "0x" in config:
        return None
    signature = [(tuple(a.shape), str(a.dtype), repr(a.sharding)) for a in args]
    devices = [(d.platform, d.device_kind) for d in jax.devices()]
    text = repr((config, signature, bool(jax.config.jax_enable_x64), str(jax.config.jax_default_matmul_precision),
                 devices, source_fingerprint()))
    return os.path.join(_directory, hashlib.sha256(text.encode()).hexdigest() + ".ibflow-program")


def skeleton(out):
    """`out` with each array replaced by its `jax.ShapeDtypeStruct` (picklable, no data)."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if eqx.is_array(x) else x, out)


def _is_struct(x) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def split(skel):
    """`(structs, treedef, static)` of a `skeleton`: its arrays' shapes and dtypes in the order of
    `jax.tree_util.tree_leaves`, the tree structure of its array part and its non-array part."""
    dynamic, static = eqx.partition(skel, _is_struct, is_leaf=_is_struct)
    structs, treedef = jax.tree_util.tree_flatten(dynamic, is_leaf=_is_struct)
    return structs, treedef, static


def load(path: str):
    """`(exported, treedef, static)` from `path`, or None when absent, unreadable or not matching
    its own outputs: the program, the tree structure of its outputs' arrays and their non-array part."""
    try:
        with open(path, "rb") as f:
            blob, skel = pickle.load(f)
        exported = jax.export.deserialize(blob)
        structs, treedef, static = split(skel)
        if [(tuple(s.shape), s.dtype) for s in structs] != [(tuple(a.shape), a.dtype) for a in exported.out_avals]:
            return None
    except Exception:  # noqa: BLE001 - a damaged or foreign file only costs the speed-up
        return None
    try:
        os.utime(path)  # recently used (`_prune`)
    except OSError:
        pass  # a read-only directory: still usable
    return exported, treedef, static


def save(path: str, exported, skel) -> None:
    """Write `(exported, skel)` to `path` atomically; failures are ignored."""
    tmp = None
    try:
        blob = exported.serialize()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            pickle.dump((bytes(blob), skel), f)
        os.replace(tmp, path)
        _prune(os.path.dirname(path))
    except Exception:  # noqa: BLE001 - an unwritable directory only costs the speed-up
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _prune(directory: str) -> None:
    """Remove the least recently used programs beyond `MAX_PROGRAMS`."""
    entries = [e for e in os.scandir(directory) if e.name.endswith(".ibflow-program")]
    if len(entries) > MAX_PROGRAMS:
        entries.sort(key=lambda e: e.stat().st_mtime)
        for e in entries[:len(entries) - MAX_PROGRAMS]:
            os.unlink(e.path)


def compile_program(fn, args, config: str | None = None, name: str = "program", on_lowered=None):
    """`fn` (a function of the arrays `args` returning a PyTree) compiled for `args`'s signature:
    returns a function of arrays of that signature giving `fn`'s output, its non-array part (e.g.
    static fields of Equinox modules) recorded when `fn` was traced and put back.

    With a `config` (a text naming everything `fn` depends on besides `args`) and programs kept
    (`set_directory`), a program kept under (`config`, `args`) is deserialised instead of tracing
    `fn`; else `fn` is traced, exported and kept. Without, or when exporting or a kept program
    fails, `fn` is traced as by `jax.jit`. The compiled module is named `jit_<name>` when traced
    here and `jit_<name>_program` when it comes from an exported program. `on_lowered()` is
    called between lowering and XLA's compilation, which releases the GIL."""
    recorded = []  # the outputs' skeleton, recorded at trace time

    def program(*a):
        out = fn(*a)
        recorded[:] = [skeleton(out)]
        return eqx.filter(out, eqx.is_array)

    program.__name__ = program.__qualname__ = name

    def compile_lowered(lowered):
        if on_lowered is not None:
            on_lowered()
        return lowered.compile()

    def from_exported(exported, treedef, static):
        def call(*a):
            return exported.call(*a)

        call.__name__ = call.__qualname__ = f"{name}_program"
        compiled = compile_lowered(jax.jit(call).lower(*args))
        return lambda *a: eqx.combine(jax.tree_util.tree_unflatten(treedef, compiled(*a)), static)

    def traced():
        compiled = compile_lowered(jax.jit(program).lower(*args))
        static = split(recorded[0])[2]
        return lambda *a: eqx.combine(compiled(*a), static)

    path = None if config is None else program_path(config, args)
    if path is None:
        return traced()
    found = load(path)
    if found is not None:
        try:
            return from_exported(*found)
        except Exception:  # noqa: BLE001 - a kept program this process cannot run: traced anew
            pass
    try:
        exported = jax.export.export(jax.jit(lambda *a: jax.tree_util.tree_leaves(program(*a))))(*args)
    except Exception:  # noqa: BLE001 - e.g. a custom call jax.export cannot serialise
        return traced()
    save(path, exported, recorded[0])
    return from_exported(exported, *split(recorded[0])[1:])
