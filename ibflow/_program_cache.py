"""Traced sweep programs kept on disk between processes (`jax.export`).

JAX's persistent compilation cache lets a later process skip XLA's compilation of a program it
has compiled before, but not the tracing and lowering that produce the program (1.9-2.3 s for
the Azulay Fig. 7.1 sweep's chunk on 2 cores, more than the compilation left to do). The
command line therefore also keeps each traced chunk program, serialised with `jax.export`
(StableHLO, no Python), together with the structure of its outputs, and a later sweep of the
same configuration and shapes deserialises it instead of tracing again; its compilation then
comes from the compilation cache. Measured (Fig. 7.1 grid, `ibflow sweep --certify` on new data
after a first sweep filled both caches, 4 interleaved pairs): 0.5-0.6 s from the end of the
imports to the lowered chunk program against 1.9-2.3 s, whole command 5.4-7.1 s against
7.1-9.3 s.

A program is found again only under a key of everything its trace depends on: the sweep's
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

_directory: str | None = None  #: set by the command line (`set_directory`); None: off
#: Programs kept at most (~80 KB each for the Fig. 7.1 sweep's chunk); the least recently used go.
MAX_PROGRAMS = 256


def set_directory(path: str | None) -> None:
    """Keep traced programs under `path` (None: do not)."""
    global _directory
    _directory = path


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
    """The file of the program traced for `config` (a text naming the sweep's configuration)
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
