"""Every environment variable fastattn reads: its default, its values and its parsing rule, in one place.

The library reads the environment here and nowhere else (kernels receive values, never the environment); the build
(``setup.py``) loads this very file for its own switches, so both parse ``1/true/yes/on`` alike. A bad value is a
``ValueError`` naming the variable, raised when the setting is needed (a backend asked for), never at import.
The README's "Settings" table is this module's ``SETTINGS``, and a test holds the two together.

This module imports nothing but the standard library: ``setup.py`` runs it before NumPy may be installed.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Setting:
    """One environment variable: ``values`` None means a flag (on/off), ``()`` a file path, else the allowed words."""

    name: str
    default: str
    values: tuple[str, ...] | None
    when: str  # "run": read by the library when it is needed; "build": read by setup.py
    help: str
    renamed_from: tuple[tuple[str, dict[str, str]], ...] = ()  # (old variable, old value -> new value)


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "FASTATTN_BACKEND",
        "",
        ("numba", "cython", "numpy"),
        "run",
        "backend of calls that pass no `backend=` and run outside `use_backend()`; unset: the fastest available",
    ),
    Setting(
        "FASTATTN_TILES",
        "micro",
        ("micro", "blas", "loops"),
        "run",
        "how the fused attention of both compiled backends multiplies its tiles: `micro` (register-blocked "
        "micro-kernel), `blas` (SciPy's BLAS per tile), `loops` (plain loops, the readable one)",
        renamed_from=(("FASTATTN_NUMBA_ENGINE", {"tiled": "micro"}), ("FASTATTN_CYTHON_TILES", {})),
    ),
    Setting(
        "FASTATTN_CYTHON_ISA",
        "avx512",
        ("baseline", "avx2", "avx512"),
        "run",
        "the widest instruction-set build of the Cython kernels that may be loaded (the widest the CPU runs, up to "
        "this, is used)",
    ),
    Setting("FASTATTN_CYTHON_BLAS", "on", None, "run", "whether the Cython `blas` tiles may load SciPy's BLAS"),
    Setting(
        "FASTATTN_PLAN_CACHE",
        "",
        (),
        "run",
        "the file of per-machine plans (tile shapes, tile products, faster backend) that `python -m fastattn tune` "
        "writes and the kernels use; unset: `$XDG_CACHE_HOME/fastattn/plans.json` or `~/.cache/fastattn/plans.json`",
    ),
    Setting(
        "FASTATTN_BUILD_CYTHON", "on", None, "build", "build the Cython extensions at install (off: numpy+numba only)"
    ),
    Setting(
        "FASTATTN_REQUIRE_CYTHON", "off", None, "build", "a Cython build that fails is an error, not a warning (CI)"
    ),
    Setting("FASTATTN_FAIL_NO_OPENMP", "off", None, "build", "a missing OpenMP is an error, not a serial build (CI)"),
    Setting("FASTATTN_ISA_VARIANTS", "on", None, "build", "also build the AVX2 and AVX-512 variants (x86-64)"),
    Setting("FASTATTN_NATIVE", "off", None, "build", "compile with `-march=native` (a build only this CPU runs)"),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def _parse(setting: Setting, raw: str, source: str):
    if setting.values == ():  # a path: taken as written
        return raw.strip()
    word = raw.strip().lower()
    if setting.values is None:
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise ValueError(f"{source} must be one of {', '.join(_TRUE + _FALSE)} (on/off), got {raw!r}")
    if word not in setting.values:
        raise ValueError(f"{source} must be one of {', '.join(setting.values)}, got {raw!r}")
    return word


def get(name: str, environ=None):
    """The value of setting ``name``: the environment's (parsed) or the default; "" means unset for a choice.

    Raises ValueError naming the variable when its value is not allowed.

    Examples
    --------
    >>> from fastattn import _settings
    >>> _settings.get("FASTATTN_TILES", environ={})
    'micro'
    >>> _settings.get("FASTATTN_CYTHON_BLAS", environ={"FASTATTN_CYTHON_BLAS": "off"})
    False
    """
    setting = BY_NAME[name]
    env = os.environ if environ is None else environ
    raw = env.get(name, "")
    if raw.strip():
        return _parse(setting, raw, name)
    for old, mapping in setting.renamed_from:
        raw = env.get(old, "")
        if raw.strip():
            word = raw.strip().lower()
            word = mapping.get(word, word)
            warnings.warn(f"{old} is renamed {name}; read {old}={raw!r} as {name}={word!r}", DeprecationWarning, 2)
            return _parse(setting, word, f"{old} (now {name})")
    return _parse(setting, setting.default, name) if setting.default else ""


def is_set(name: str, environ=None) -> bool:
    """Whether the environment sets ``name`` (or one of its old names) to a non-blank value."""
    env = os.environ if environ is None else environ
    setting = BY_NAME[name]
    return any(env.get(n, "").strip() for n in (name,) + tuple(old for old, _ in setting.renamed_from))


def table_markdown() -> str:
    """The README's settings table, made from ``SETTINGS``."""
    rows = ["| variable | read | values | default | what it does |", "| --- | --- | --- | --- | --- |"]
    for s in SETTINGS:
        if s.values is None:
            values = "on / off"
        else:
            values = " / ".join(f"`{v}`" for v in s.values) if s.values else "a file path"
        default = f"`{s.default}`" if s.default else "unset"
        when = "at run time" if s.when == "run" else "at install (setup.py)"
        rows.append(f"| `{s.name}` | {when} | {values} | {default} | {s.help} |")
    return "\n".join(rows)
