"""Runtime configuration: the ``PRH_FAST_*`` environment variables, read once, overridable.

Every runtime setting that an environment variable can give has one home here, and one order
of precedence: an explicit argument of the call wins over :func:`config_context`, which wins
over :func:`set_config`, which wins over the environment, which wins over the built-in default.

=================  ==================================  ===========================================
setting            environment variable                value
=================  ==================================  ===========================================
``backend``        ``PRH_FAST_BACKEND``                neighbour backend name, spec string or
                                                       ``AnnParams`` (checked by the backend
                                                       registry, ``prh_fast.knn._backends``);
                                                       default ``"auto"``
``stream``         ``PRH_FAST_STREAM``                 ``"auto"``, ``"on"`` or ``"off"`` (also
                                                       ``1/0``, ``true/false``, ``yes/no``);
                                                       default ``"auto"``
``memory_budget``  ``PRH_FAST_MEMORY_BUDGET``          bytes of scratch for a streamed grid
                   (``PRH_FAST_STREAM_BUDGET``,        computation; default ``None`` (the
                   deprecated alias)                   operation's own default)
``dist_timeout``   ``PRH_FAST_DIST_TIMEOUT``           seconds for every collective; default
                                                       ``None`` (30 minutes)
``dist_backend``   ``PRH_FAST_DIST_BACKEND``           ``"auto"``, ``"gloo"`` or ``"nccl"``;
                                                       default ``"auto"``
``cache_dir``      ``PRH_FAST_CACHE``                  folder for converted models; default
                                                       ``None`` (``~/.cache/prh_fast``)
``traceback``      ``PRH_FAST_TRACEBACK``              the CLI shows tracebacks of user errors
                                                       too; default ``False``
``num_threads``    ``PRH_FAST_NUM_THREADS``            CPU threads of every prh_fast computation
                                                       (torch's intra-op pool and the native
                                                       kernels together, ``prh_fast._threads``);
                                                       default ``None`` (torch's own count)
``cpu_screen``     ``PRH_FAST_CPU_SCREEN``             precision of the CPU search's candidate
                                                       products: ``"auto"`` (bfloat16 where the
                                                       CPU has fast bfloat16, else float32),
                                                       ``"bfloat16"`` or ``"float32"``; the lists
                                                       are exact either way; default ``"auto"``
=================  ==================================  ===========================================

The environment is parsed at first use; the parse is kept and redone only when the raw value
of one of these variables changes (or after :func:`reload_environment`), so reading the
configuration costs a few dictionary lookups. A variable with an invalid value raises
:class:`~prh_fast.errors.InputError` naming the variable when its setting is read, not before:
a bad ``PRH_FAST_DIST_TIMEOUT`` does not break a neighbour search.

:func:`config_context` overrides live in a :mod:`contextvars` variable: they hold for the
block in the thread (or asyncio task) that entered it; new threads start from the
:func:`set_config` / environment values. Module state: the parsed environment and the
:func:`set_config` settings are replaced whole under one lock (readers never see a dict being
changed), so any thread may read or set the configuration at any time.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
import threading
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prh_fast.errors import InputError

__all__ = ["Config", "get_config", "set_config", "config_context", "reload_environment"]

#: Settings and their defaults.
DEFAULTS = {
    "backend": "auto",
    "stream": "auto",
    "memory_budget": None,
    "dist_timeout": None,
    "dist_backend": "auto",
    "cache_dir": None,
    "traceback": False,
    "num_threads": None,
    "cpu_screen": "auto",
}

#: Setting -> the environment variable it is read from.
ENV_VARS = {
    "backend": "PRH_FAST_BACKEND",
    "stream": "PRH_FAST_STREAM",
    "memory_budget": "PRH_FAST_MEMORY_BUDGET",
    "dist_timeout": "PRH_FAST_DIST_TIMEOUT",
    "dist_backend": "PRH_FAST_DIST_BACKEND",
    "cache_dir": "PRH_FAST_CACHE",
    "traceback": "PRH_FAST_TRACEBACK",
    "num_threads": "PRH_FAST_NUM_THREADS",
    "cpu_screen": "PRH_FAST_CPU_SCREEN",
}
#: Deprecated environment variable -> the one that replaces it.
DEPRECATED_ENV = {"PRH_FAST_STREAM_BUDGET": "PRH_FAST_MEMORY_BUDGET"}

_STREAM_MODES = {"auto": "auto", "1": "on", "on": "on", "true": "on", "yes": "on",
                 "0": "off", "off": "off", "false": "off", "no": "off"}
_DIST_BACKENDS = ("auto", "gloo", "nccl")
_FALSE_WORDS = ("", "0", "false", "no", "off")


# ------------------------------------------------------------------------------ value parsers
def parse_stream(value, name: str) -> str:
    """``"auto"``, ``"on"`` or ``"off"`` from a string or a bool.

    Args:
        value: ``True`` / ``False``, or a string such as ``"auto"``, ``"on"``, ``"1"``,
            ``"false"`` (case and surrounding blanks ignored).
        name: the argument or variable named in the error.

    Returns:
        The mode: ``"auto"``, ``"on"`` or ``"off"``.

    Raises:
        InputError: naming ``name`` for anything else.

    Example:
        >>> parse_stream("Yes", "stream"), parse_stream(False, "stream")
        ('on', 'off')
    """
    if isinstance(value, bool):
        return "on" if value else "off"
    mode = _STREAM_MODES.get(str(value).strip().lower()) if isinstance(value, str) else None
    if mode is None:
        raise InputError(f"{name}: expected 'auto', 'on'/True or 'off'/False, got {value!r}")
    return mode


def _parse_backend(value, name: str):
    # The name itself is checked by the backend registry (it knows the names and the spec
    # grammar); here only that it is something to check.
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise InputError(f"{name}: expected a backend name, got an empty string")
    return value


def _parse_memory_budget(value, name: str):
    from prh_fast._validate import check_memory_budget

    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise InputError(f"{name}: expected a number of bytes, got {text!r}") from None
    try:
        return check_memory_budget(value, 0)
    except ValueError:
        raise InputError(f"{name}: expected a positive number of bytes, got {value!r}") from None


def _parse_dist_timeout(value, name: str):
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise InputError(f"{name}: expected seconds, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not value > 0:
        raise InputError(f"{name}: expected a positive number of seconds, got {value!r}")
    return float(value)


def parse_dist_backend(value, name: str) -> str:
    """``"auto"``, ``"gloo"`` or ``"nccl"`` (any case); InputError naming ``name`` else.

    Example:
        >>> parse_dist_backend("NCCL", "backend")
        'nccl'
    """
    low = value.strip().lower() if isinstance(value, str) else None
    if low not in _DIST_BACKENDS:
        raise InputError(f"{name}: expected 'auto', 'gloo' or 'nccl', got {value!r}")
    return low


def _parse_cache_dir(value, name: str):
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise InputError(f"{name}: expected a folder path, got {type(value).__name__}")
    return value or None


def _parse_traceback(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        # Any other non-empty value switches it on, as a plain "set the variable" flag.
        return value.strip().lower() not in _FALSE_WORDS
    raise InputError(f"{name}: expected True or False, got {value!r}")


def _parse_num_threads(value, name: str):
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise InputError(f"{name}: expected a positive number of threads, got {value!r}") \
                from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name}: expected a positive number of threads, got {value!r}")
    return int(value)


_CPU_SCREENS = {"auto": "auto", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float32": "float32", "fp32": "float32"}


def parse_cpu_screen(value, name: str) -> str:
    """``"auto"``, ``"bfloat16"`` or ``"float32"`` (``"bf16"`` / ``"fp32"`` and any case too).

    Example:
        >>> parse_cpu_screen("BF16", "cpu_screen")
        'bfloat16'
    """
    low = value.strip().lower() if isinstance(value, str) else None
    if low not in _CPU_SCREENS:
        raise InputError(f"{name}: expected 'auto', 'bfloat16' or 'float32', got {value!r}")
    return _CPU_SCREENS[low]


_PARSERS = {
    "backend": _parse_backend,
    "stream": parse_stream,
    "memory_budget": _parse_memory_budget,
    "dist_timeout": _parse_dist_timeout,
    "dist_backend": parse_dist_backend,
    "cache_dir": _parse_cache_dir,
    "traceback": _parse_traceback,
    "num_threads": _parse_num_threads,
    "cpu_screen": parse_cpu_screen,
}


class _Invalid:
    """A setting whose environment value did not parse: raises when the setting is read."""

    __slots__ = ("error",)

    def __init__(self, error: InputError):
        self.error = error


# ------------------------------------------------------------------------------ the snapshot
class Config:
    """The settings in force: a read-only snapshot (see the module docstring for the fields).

    Attributes are the settings (``backend``, ``stream``, ``memory_budget``, ``dist_timeout``,
    ``dist_backend``, ``cache_dir``, ``traceback``, ``num_threads``, ``cpu_screen``). Reading
    one whose environment variable holds an invalid value raises
    :class:`~prh_fast.errors.InputError` naming the variable.

    Example:
        >>> with config_context(stream="off"):
        ...     get_config().stream
        'off'
    """

    __slots__ = ("_values", "_origins")

    if TYPE_CHECKING:  # the settings' types, for type checkers (read through __getattr__)
        backend: Any
        stream: str
        memory_budget: int | None
        dist_timeout: float | None
        dist_backend: str
        cache_dir: str | None
        traceback: bool
        num_threads: int | None
        cpu_screen: str

    def __init__(self, values: dict[str, Any], origins: dict[str, str]) -> None:
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_origins", dict(origins))

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name not in values:
            raise AttributeError(f"prh_fast config has no setting {name!r}")
        v = values[name]
        if isinstance(v, _Invalid):
            raise v.error
        return v

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("the config is read-only; use set_config() or config_context()")

    def origin(self, name: str) -> str:
        """Where setting ``name`` comes from: ``"default"``, ``"set_config"``,
        ``"config_context"`` or the environment variable's name."""
        if name not in self._origins:
            raise AttributeError(f"prh_fast config has no setting {name!r}")
        return self._origins[name]

    def as_dict(self) -> dict[str, Any]:
        """Every setting as a plain dict (raises for an invalid environment value)."""
        return {name: getattr(self, name) for name in DEFAULTS}

    def __repr__(self) -> str:
        parts = []
        for name, v in self._values.items():
            shown = "<invalid>" if isinstance(v, _Invalid) else repr(v)
            parts.append(f"{name}={shown}")
        return f"Config({', '.join(parts)})"


_lock = threading.Lock()
_env_snapshot = None  # (raw values of the variables, parsed values, origins)
_warned_deprecated: set = set()
# set_config()'s settings: replaced as a whole under _lock, never changed in place, so that
# get_config() in another thread reads one consistent dict without taking the lock
_global: dict[str, object] = {}
_context: contextvars.ContextVar = contextvars.ContextVar("prh_fast_config", default=None)
_WATCHED = tuple(ENV_VARS.values()) + tuple(DEPRECATED_ENV)


def _parse_environment(raw: dict):
    values, origins = dict(DEFAULTS), dict.fromkeys(DEFAULTS, "default")
    for field, var in ENV_VARS.items():
        text, source = raw.get(var), var
        if not text:
            old = next((o for o, new in DEPRECATED_ENV.items() if new == var and raw.get(o)),
                       None)
            if old is None:
                continue
            text, source = raw[old], old
            if old not in _warned_deprecated:
                _warned_deprecated.add(old)
                warnings.warn(f"{old} is deprecated; set {var} instead", DeprecationWarning,
                              stacklevel=4)
        try:
            values[field] = _PARSERS[field](text, source)
        except InputError as err:
            values[field] = _Invalid(err)
        origins[field] = source
    return values, origins


def _environment():
    global _env_snapshot
    raw = tuple(os.environ.get(v) for v in _WATCHED)
    snap = _env_snapshot
    if snap is None or snap[0] != raw:
        with _lock:
            values, origins = _parse_environment(dict(zip(_WATCHED, raw)))
            snap = _env_snapshot = (raw, values, origins)
    return snap[1], snap[2]


def reload_environment() -> None:
    """Forget the parsed environment: the next :func:`get_config` reads the variables again.

    Example:
        >>> reload_environment()
    """
    global _env_snapshot
    with _lock:
        _env_snapshot = None


def _checked(overrides: dict, source: str) -> dict:
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"{source}: unknown setting(s) {unknown}; expected some of "
                        f"{sorted(DEFAULTS)}")
    return {name: _PARSERS[name](v, name) for name, v in overrides.items() if v is not None}


def get_config() -> Config:
    """The settings in force here: environment, then :func:`set_config`, then the innermost
    :func:`config_context`.

    Returns:
        A read-only :class:`Config`.

    Example:
        >>> get_config().origin("stream") in ("default", "PRH_FAST_STREAM", "set_config")
        True
    """
    env, origins = _environment()
    values = dict(env)
    origins = dict(origins)
    for layer, source in ((_global, "set_config"), (_context.get() or {}, "config_context")):
        # each layer is read once: set_config replaces its dict, config_context its own copy
        for name, v in layer.items():
            values[name] = v
            origins[name] = source
    return Config(values, origins)


def set_config(*, backend: object = None, stream: str | bool | None = None,
               memory_budget: int | None = None, dist_timeout: float | None = None,
               dist_backend: str | None = None, cache_dir: str | os.PathLike[str] | None = None,
               traceback: bool | None = None, num_threads: int | None = None,
               cpu_screen: str | None = None) -> None:
    """Set process-wide defaults (over the environment); ``None`` leaves a setting unchanged.

    Args:
        backend: neighbour backend (name, spec string or ``AnnParams``).
        stream: ``"auto"``, ``"on"`` / ``True`` or ``"off"`` / ``False``.
        memory_budget: bytes of scratch for a streamed grid computation.
        dist_timeout: seconds for every collective.
        dist_backend: ``"auto"``, ``"gloo"`` or ``"nccl"``.
        cache_dir: folder for converted models.
        traceback: the CLI shows tracebacks of user errors too.
        num_threads: CPU threads of prh_fast's computations (torch's pool and the native
            kernels together).
        cpu_screen: ``"auto"``, ``"bfloat16"`` or ``"float32"``: precision of the CPU
            search's candidate products (lists are exact either way).

    Raises:
        InputError: naming the setting, for an invalid value.

    Example:
        >>> set_config(stream="off"); get_config().stream
        'off'
        >>> reset_config()
    """
    new = _checked(dict(backend=backend, stream=stream, memory_budget=memory_budget,
                        dist_timeout=dist_timeout, dist_backend=dist_backend,
                        cache_dir=cache_dir, traceback=traceback, num_threads=num_threads,
                        cpu_screen=cpu_screen), "set_config")
    global _global
    with _lock:
        _global = {**_global, **new}


def reset_config() -> None:
    """Drop every :func:`set_config` setting (the environment applies again).

    Example:
        >>> reset_config()
    """
    global _global
    with _lock:
        _global = {}


@contextlib.contextmanager
def config_context(*, backend: object = None, stream: str | bool | None = None,
                   memory_budget: int | None = None, dist_timeout: float | None = None,
                   dist_backend: str | None = None,
                   cache_dir: str | os.PathLike[str] | None = None,
                   traceback: bool | None = None, num_threads: int | None = None,
                   cpu_screen: str | None = None) -> Iterator[Config]:
    """Override settings inside a ``with`` block (this thread / task only); ``None`` leaves a
    setting as it is. Arguments as :func:`set_config`.

    Raises:
        InputError: naming the setting, for an invalid value (before the block runs).

    Example:
        >>> with config_context(backend="torch"):
        ...     get_config().backend
        'torch'
    """
    new = _checked(dict(backend=backend, stream=stream, memory_budget=memory_budget,
                        dist_timeout=dist_timeout, dist_backend=dist_backend,
                        cache_dir=cache_dir, traceback=traceback, num_threads=num_threads,
                        cpu_screen=cpu_screen), "config_context")
    token = _context.set({**(_context.get() or {}), **new})
    try:
        yield get_config()
    finally:
        _context.reset(token)
