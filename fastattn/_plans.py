"""Per-machine plans of the fused attention, and where each came from.

A *plan* is how one compiled backend runs its fused attention on this machine: the tile products (``micro``,
``blas`` or ``loops``, see ``FASTATTN_TILES``) and the tile shape (query rows x keys). A plan never changes results
beyond rounding; it changes speed. Where a plan comes from, first match wins:

1. ``FASTATTN_TILES`` set in the environment: those tile products, with the tuned shape for them if there is one,
   else the built-in shape for them;
2. the per-user cache written by ``python -m fastattn tune`` (``FASTATTN_PLAN_CACHE``, default
   ``$XDG_CACHE_HOME/fastattn/plans.json`` or ``~/.cache/fastattn/plans.json``), keyed by CPU model name, ISA,
   thread count, dtype and head width;
3. the built-in default of this CPU family (``BUILTIN``: AMD Zen, Intel, other).

The cache also records which backend ``tune`` measured faster; the automatic backend choice follows it
(``preferred_backend``). A cache that cannot be read, is not JSON, has another format version or holds a bad entry
is ignored with a ``RuntimeWarning`` (once per process), never an error. ``fastattn.plan_info()`` reports all of it.

This module imports only the standard library and reads no kernel: the registry (``fastattn._backends``) asks it
for each backend's plans and hands them to the backend's ``configure``.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import threading
import warnings
from dataclasses import dataclass

from . import _settings

#: Format of the cache file; a file of another version is ignored (with a warning). Bump it when the meaning of a
#: tile shape changes in the kernels.
CACHE_VERSION = 1

TILE_PRODUCTS = ("micro", "blas", "loops")
COMPILED = ("numba", "cython")

# Built-in tile shapes per CPU family, backend and tile products: (query rows, keys). The AMD Zen values were
# measured on a 2-core AMD EPYC (Zen 5, AVX-512), float32, B=1 H=12 d=64, N=1024 and 4096 (kernels/cython/
# _attention.pyx notes the Cython ones). Intel and other CPUs start from the same values until measured: run
# ``python -m fastattn tune`` there.
_ZEN = {
    "numba": {"micro": (192, 384), "blas": (192, 384), "loops": (192, 384)},
    "cython": {"micro": (256, 512), "blas": (256, 512), "loops": (64, 128)},
}
BUILTIN: dict[str, dict[str, dict[str, tuple[int, int]]]] = {"amd-zen": _ZEN, "intel": _ZEN, "other": _ZEN}
FAMILY_NAMES = {"amd-zen": "AMD Zen", "intel": "Intel", "other": "other CPUs"}
_FAMILY_NOTES = {
    "amd-zen": "",
    "intel": " (the AMD Zen values, not yet measured on Intel: run `python -m fastattn tune`)",
    "other": " (the AMD Zen values: run `python -m fastattn tune`)",
}
DEFAULT_TILES = "micro"

#: The compiled backend whose fused attention ran faster on each CPU family where it was measured side by side
#: (``python -m fastattn bench --threads 2 --families attention``, float32, B=1 H=12 d=64, N = 1024-4096, full and
#: causal): the automatic choice until ``python -m fastattn tune`` measures the machine itself. None: not measured.
BUILTIN_FASTER: dict[str, tuple[str, str] | None] = {
    "amd-zen": ("cython", "AMD EPYC (Zen 5), 2 threads, 2026-12-02: cython 1.04-1.20x numba"),
    "intel": ("cython", "Intel Xeon (Sapphire Rapids class), 2 threads, issue 12's figures: cython 1.18-1.22x numba"),
    "other": None,
}


@dataclass(frozen=True)
class Plan:
    """How one backend runs its fused attention: tile products, tile shape (query rows x keys), and why."""

    tiles: str
    block_q: int
    block_k: int
    source: str

    def describe(self) -> str:
        return f"{self.tiles} tiles {self.block_q}x{self.block_k}"

    def as_tuple(self) -> tuple[str, int, int]:
        return (self.tiles, self.block_q, self.block_k)


# --------------------------------------------------------------------------------------------------------------
# This machine
# --------------------------------------------------------------------------------------------------------------
def _cpuinfo_field(field: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name as the OS reports it (/proc/cpuinfo on Linux, else ``platform``)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown CPU"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    return frozenset((_cpuinfo_field("flags") or "").split())


@functools.lru_cache(maxsize=1)
def cpu_family() -> str:
    """ "amd-zen", "intel" or "other"."""
    vendor = (_cpuinfo_field("vendor_id") or "").lower()
    model = cpu_model().lower()
    if "amd" in vendor or "amd" in model:
        return "amd-zen"
    if "intel" in vendor or "intel" in model:
        return "intel"
    return "other"


@functools.lru_cache(maxsize=1)
def cpu_isa() -> str:
    """The widest vector instruction set the CPU runs that the kernels use: avx512, avx2, or the architecture."""
    flags = cpu_flags()
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags and "fma" in flags:
        return "avx2"
    return platform.machine().lower() or "baseline"


@functools.lru_cache(maxsize=1)
def cpu_id() -> str:
    """The model name with the CPU family and model numbers where the OS gives them (a virtual machine may report
    only "AMD EPYC"): the CPU part of the cache key."""
    family, model = _cpuinfo_field("cpu family"), _cpuinfo_field("model\t") or _cpuinfo_field("model ")
    extra = f" (family {family}, model {model})" if family and model else ""
    return cpu_model() + extra


def machine_key(threads: int) -> str:
    return f"{cpu_id()}|{cpu_isa()}|{int(threads)}"


def entry_key(threads: int, dtype: str, head_dim: int) -> str:
    """The cache key of one measurement: CPU model | ISA | threads | dtype | head width."""
    return f"{machine_key(threads)}|{dtype}|{int(head_dim)}"


def machine() -> dict:
    """What the plans are keyed on: CPU model name, family, ISA, and the thread count the kernels use now."""
    from ._threads import get_num_threads

    return {
        "cpu": cpu_id(),
        "family": FAMILY_NAMES[cpu_family()],
        "isa": cpu_isa(),
        "threads": get_num_threads(),
    }


# --------------------------------------------------------------------------------------------------------------
# The cache file
# --------------------------------------------------------------------------------------------------------------
_cache_override: list[str | None] = [None]  # set by ``python -m fastattn tune --cache FILE`` while it runs


def cache_path() -> str:
    """``FASTATTN_PLAN_CACHE``, else ``$XDG_CACHE_HOME/fastattn/plans.json``, else ``~/.cache/fastattn/plans.json``."""
    path = _cache_override[0] or _settings.get("FASTATTN_PLAN_CACHE")
    if path:
        return os.path.expanduser(path)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastattn", "plans.json")


_state_lock = threading.Lock()
_read: dict = {}  # path -> (entries, status) as read once per process
_warned: set[str] = set()


def _valid_plan(p) -> bool:
    return (
        isinstance(p, dict)
        and p.get("tiles") in TILE_PRODUCTS
        and all(type(p.get(k)) is int and p[k] >= 1 for k in ("block_q", "block_k"))
    )


def _check_entry(key: str, entry) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"entry {key!r} is not an object")
    plans = entry.get("plans")
    if not isinstance(plans, dict) or not all(b in COMPILED and _valid_plan(p) for b, p in plans.items()):
        raise ValueError(f"entry {key!r} has no valid 'plans' (backend -> tiles, block_q, block_k)")
    if entry.get("faster") not in (None,) + COMPILED:
        raise ValueError(f"entry {key!r}: 'faster' must be one of {COMPILED}, got {entry.get('faster')!r}")


def _load(path: str) -> tuple[dict, str]:
    """(entries, status) of the cache at ``path``: a file that cannot be used gives no entries and says why."""
    if not os.path.exists(path):
        return {}, "no cache file (run `python -m fastattn tune`)"
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        if doc.get("version") != CACHE_VERSION:
            raise ValueError(f"format version {doc.get('version')!r}, this fastattn reads version {CACHE_VERSION}")
        entries = doc.get("entries")
        if not isinstance(entries, dict):
            raise ValueError("no 'entries' object")
        for key, entry in entries.items():
            _check_entry(key, entry)
    except (OSError, ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
        status = f"ignored ({type(exc).__name__}: {exc}); using the built-in defaults"
        if path not in _warned:
            _warned.add(path)
            warnings.warn(f"fastattn plan cache {path} {status}", RuntimeWarning, stacklevel=4)
        return {}, status
    return entries, f"read, {len(entries)} entries"


def cached_entries() -> tuple[dict, str]:
    """The cache's entries (all machines) and a status line, read once per process per path."""
    path = cache_path()
    with _state_lock:
        if path not in _read:
            _read[path] = _load(path)
        return _read[path]


def forget() -> None:
    """Read the cache again on next use (after ``tune`` wrote it, or a test moved it)."""
    with _state_lock:
        _read.clear()
        _warned.clear()


def store(new_entries: dict) -> str:
    """Merge ``new_entries`` (key -> entry) into the cache file (written atomically); returns its path."""
    path = cache_path()
    doc = {"version": CACHE_VERSION, "entries": {}}
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
            if isinstance(old, dict) and old.get("version") == CACHE_VERSION and isinstance(old.get("entries"), dict):
                doc["entries"].update(old["entries"])
        except (OSError, ValueError):  # unreadable: replaced
            pass
    for key, entry in new_entries.items():
        _check_entry(key, entry)
    doc["entries"].update(new_entries)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    forget()
    return path


# --------------------------------------------------------------------------------------------------------------
# Plans for a backend
# --------------------------------------------------------------------------------------------------------------
def builtin_plan(backend: str, tiles: str | None = None) -> Plan:
    family = cpu_family()
    tiles = tiles or DEFAULT_TILES
    bq, bk = BUILTIN[family][backend][tiles]
    return Plan(tiles, bq, bk, f"built-in default for {FAMILY_NAMES[family]}{_FAMILY_NOTES[family]}")


def _tiles_override() -> str | None:
    """FASTATTN_TILES (or its old names) when the user set it, else None (the plans decide)."""
    return _settings.get("FASTATTN_TILES") if _settings.is_set("FASTATTN_TILES") else None


def _entries_for(threads: int) -> dict[tuple[str, int], dict]:
    """This machine's tuned entries at ``threads`` threads: (dtype, head width) -> entry."""
    prefix = machine_key(threads) + "|"
    found = {}
    for key, entry in cached_entries()[0].items():
        if key.startswith(prefix):
            dtype, _, head = key[len(prefix) :].partition("|")
            if head.isdigit():
                found[(dtype, int(head))] = entry
    return found


def _primary(entries: dict):
    """The entry that speaks for the machine where one plan must serve every call: float32 with head width 64 if
    tuned, else the float32 one of the widest head, else any."""
    if not entries:
        return None, None
    if ("float32", 64) in entries:
        return ("float32", 64), entries[("float32", 64)]
    key = max(entries, key=lambda k: (k[0] == "float32", k[1]))
    return key, entries[key]


def plans_for(backend: str, threads: int) -> tuple[Plan, dict[tuple[str, int], Plan]]:
    """(the plan of calls no tuned entry matches, {(dtype, head width): tuned plan}) of a compiled backend."""
    override = _tiles_override()
    entries = _entries_for(threads)
    shaped: dict[tuple[str, int], Plan] = {}
    for (dtype, head), entry in entries.items():
        p = entry["plans"].get(backend)
        if p is None or (override is not None and p["tiles"] != override):
            continue
        shaped[(dtype, head)] = Plan(p["tiles"], p["block_q"], p["block_k"], f"tuned {entry.get('date', '?')}")
    key, _ = _primary(entries)
    if key is not None and key in shaped:
        default = shaped[key]
        default = Plan(default.tiles, default.block_q, default.block_k, f"{default.source} ({key[0]}, d={key[1]})")
    else:
        default = builtin_plan(backend, override)
    if override is not None and not default.source.startswith("tuned"):
        default = Plan(default.tiles, default.block_q, default.block_k, f"FASTATTN_TILES={override}; {default.source}")
    return default, shaped


def builtin_faster(available) -> tuple[str | None, str]:
    """The compiled backend measured faster on this CPU family (``BUILTIN_FASTER``), if available, and why."""
    known = BUILTIN_FASTER.get(cpu_family())
    if known is None or known[0] not in available:
        return None, ""
    return known[0], f"{known[0]}: measured faster on {FAMILY_NAMES[cpu_family()]} CPUs ({known[1]})"


def preferred_backend(threads: int, available) -> tuple[str | None, str]:
    """The compiled backend ``tune`` measured faster on this machine (among ``available``), and why; (None, "")
    when nothing was measured here."""
    key, entry = _primary(_entries_for(threads))
    if entry is None or entry.get("faster") not in available:
        return None, ""
    faster = entry["faster"]
    ratio = entry.get("speedup")
    by = f", {ratio:.2f}x the other" if isinstance(ratio, (int, float)) else ""
    return faster, (
        f"{faster}: measured faster on this machine by `fastattn tune` at {entry.get('date', '?')} "
        f"({key[0]}, d={key[1]}, {threads} threads{by})"
    )
