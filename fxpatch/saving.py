"""Keeping values past the end of a trace: ``.save()``, ``fxpatch.save(...)`` and
binding the saved values to the user's variables when the outermost block exits.

As in NNsight, ``.save()`` works on plain containers while a trace records
(``logits = list().save()``, ``dict().save()``): ``mount_save`` puts a ``save``
method on ``list``, ``dict``, ``set`` and ``tuple`` while at least one trace (in
any thread) is recording, and ``unmount_save`` takes it off when the last one
stops; it acts on the calling thread's own trace. NNsight mounts it on
``object``; fxpatch does not, because libraries that list an object's
attributes when they are imported (torch inductor lists its ops handler's
methods) would then see a ``save`` on every class imported during a trace.
Lists and dicts that existed before a trace and that the
block fills with traced values (``acts.append(h)``) are filled with the real
values after it, without ``.save()``: ``scope_of`` notes them when the block
starts and ``keep_appended`` keeps what was put in them, counting references
first so that what nothing was put in is not looked through.
"""

from __future__ import annotations

import ctypes
import gc
import sys
import threading
from bisect import bisect_right
from itertools import accumulate, compress
from typing import Any

from .active import active_tracer
from .errors import FxpatchError, user_location
from .module_values import SiteContainer, SiteDict
from .proxy import _UNSET, Proxy
from .watch import type_dict


def save(value: Any) -> Any:
    """Keep ``value`` after the trace: a proxy, or a list/dict that will collect proxies.

    Example::

        with model.generate("Hello", max_new_tokens=3) as tracer:
            hs = fxpatch.save([])
            for step in tracer.all():
                hs.append(model.transformer.h[-1].output[:, -1])
        # hs is a list of 3 tensors
    """
    if isinstance(value, (Proxy, SiteContainer)):
        return value.save()
    return _save_object(value, "fxpatch.save()")


def _save_object(value: Any, what: str) -> Any:
    tracer = active_tracer()
    from .session import active_session

    session = active_session()
    if session is not None:  # kept past the session, whatever it is
        session.note_saved(value)
        if tracer is None:
            return value
    if tracer is None:
        raise FxpatchError(f"{what} was called outside a trace", at=user_location(),
                           hint="Call it inside `with model.trace(...)` or `with model.generate(...)`.")
    tracer.saved_containers.append(value)
    return value


def _object_save(self: Any, _: Any = None) -> Any:
    """``value.save()`` on any object while a trace records: keep it (a list or dict is filled
    with the real values of the traced values it holds after the trace).

    The unused default argument is NNsight's too: code that introspects every method of a
    class (torch's inductor generates wrappers for them) treats a method with defaults generically.
    """
    return _save_object(self, ".save()")


# -- ``.save()`` on every object while a trace records ---------------------------------------------------------
_MOUNT_LOCK = threading.Lock()
_RECORDING: set[int] = set()  # ids of the traces recording now, in every thread
_ABSENT = object()
_MOUNTED_ON = (list, dict, set, tuple)
_previous: dict[type, Any] = {}  # what each type's ``save`` was before fxpatch mounted its own


_TYPE_DICTS = {cls: type_dict(cls) for cls in _MOUNTED_ON}  # a type's dict object lives as long as the type


def _set_save(cls: type, value: Any) -> None:
    d = _TYPE_DICTS[cls]
    if value is _ABSENT:
        d.pop("save", None)
    else:
        d["save"] = value
    ctypes.pythonapi.PyType_Modified(ctypes.py_object(cls))  # drop cached attribute lookups


def mount_save(tracer: Any) -> None:
    """``tracer`` starts recording: ``x.save()`` works on any ``x`` until the last trace stops."""
    with _MOUNT_LOCK:
        if not _RECORDING:
            for cls in _MOUNTED_ON:
                _previous[cls] = _TYPE_DICTS[cls].get("save", _ABSENT)
                _set_save(cls, _object_save)
        _RECORDING.add(id(tracer))


def unmount_save(tracer: Any) -> None:
    """``tracer`` stopped recording (at its exit, also when its block raised); idempotent."""
    with _MOUNT_LOCK:
        if id(tracer) not in _RECORDING:
            return
        _RECORDING.discard(id(tracer))
        if not _RECORDING:
            for cls in _MOUNTED_ON:
                _set_save(cls, _previous.pop(cls, _ABSENT))


_SCAN_LIMIT = 10_000  # containers larger than this are searched only if fxpatch.save() registered them
_VISIT_LIMIT = 100_000  # elements looked at, in all, for traced values put into containers made before a trace


_WALKED = frozenset((list, dict, tuple))  # looked into at once (subclasses: if not a SiteContainer)
_ATOMS = frozenset((int, float, str, bool, bytes, type(None)))


def _is_container(value: Any) -> bool:
    return isinstance(value, (list, dict)) and not isinstance(value, SiteContainer)


def scope_of(frame) -> list[dict]:
    """The variables of ``frame`` (and of its module) as a trace starts: copies of their dicts, made in C.

    The containers among them are what ``keep_appended`` looks through, and only where counting
    references says it must: a notebook's namespace may hold thousands of names (``_i1``, ``_1``, ...),
    and a trace must not cost a Python step per name to start. The copies hold strong references, so that
    no container made inside the trace can take one's id."""
    if frame is None:
        return []
    scopes = [frame.f_locals] + ([frame.f_globals] if frame.f_globals is not frame.f_locals else [])
    return [dict(scope) for scope in scopes]


def outside_containers(scope: list[dict]) -> list:
    """The lists, dicts and tuples ``scope`` (``scope_of``'s) binds names to: the containers NNsight's users
    fill inside a trace without ``.save()`` (``acts.append(h)``), and through them every container they hold.

    Only the variables are looked at, not what the containers hold: a notebook's globals may hold a
    dataset of many thousands of rows, and a trace must not cost a walk over it to start.
    """
    found: dict[int, Any] = {}
    for variables in scope:
        for name, value in variables.items():
            if (_is_container(value) or type(value) is tuple) and not name.startswith("__"):  # not __builtins__
                found[id(value)] = value
    return list(found.values())


def keep_appended(tracer, scope: list[dict], frame=None) -> tuple[list, list | None]:
    """Keep the traced values of ``tracer`` put into the containers ``scope`` (``scope_of``'s, made before the
    trace) binds names to, or into what they hold. Returns the containers that hold any, to fill after the
    run, and those walked to the end that hold none, which need no second look; ``None`` for the second
    where no container at all holds one (``bind_saved`` then binds variables alone). ``frame``: the frame
    running the block.

    First it counts references (``_held_elsewhere``): where every reference to the trace's proxies is from
    the block's variables or the trace itself, no container holds one, and nothing is looked through; where
    the others are items of the containers themselves, those items are enough. A notebook's dataset in
    scope then costs nothing at each trace.

    A walk over everything they hold, each list and dict looked at once, within the limits of
    ``_SCAN_LIMIT`` (longer containers are passed over) and ``_VISIT_LIMIT`` (elements in all). The
    containers may be a notebook's dataset, walked at every trace, so the walk goes a level at a time
    with the per-element work in C: one ``gc.get_referents`` call gathers a level's elements, and the
    next level is picked from them by their types. It goes breadth first over all the containers
    together (their elements, then what those hold, ...), so that a deep dataset that comes first in
    the scope cannot spend the limit before ``acts = []`` next to it is looked at.
    """
    elsewhere = _held_elsewhere(tracer, frame)
    if not elsewhere:
        return [], None
    containers = outside_containers(scope)
    found = _held_at_top(containers, elsewhere)
    if found is not None:
        holding = set(map(id, found))
        return found, [c for c in containers if id(c) not in holding]
    if _hold_no_proxies(tracer, containers):  # the common answer, in one pass over all of them
        return [], list(containers)
    walks = [_Walk(top) for top in containers]
    seen: set[int] = set()
    budget = _VISIT_LIMIT
    frontier = [w for w in walks if w.level]
    while frontier:
        for w in frontier:
            budget = w.step(tracer, seen, budget)
        frontier = [w for w in frontier if w.level]
    kept = [w.top for w in walks if w.found]
    untouched = [w.top for w in walks if w.complete and not w.found]
    return kept, untouched


_CO_OPTIMIZED = 0x0001  # a function's frame: its variables live in the frame, not in a dict
# before 3.13 reading a function frame's ``f_locals`` fills a dict with its variables: a second reference each
_DICT_OF_FRAME = sys.version_info < (3, 13)


def _refs(values: list) -> list[int]:
    return list(map(sys.getrefcount, values))


_HELD_BY_LIST = _refs([object()])[0]  # the count ``_refs`` gives an object that only its list holds


def _held_elsewhere(tracer, frame) -> dict[int, int]:
    """The proxies of ``tracer`` referred to from places other than the block's variables and the trace itself
    (``id`` -> how many such references): where this is empty, no container holds one.

    Every proxy of a recording trace is in ``tracer.proxies``. CPython counts references exactly: a proxy's
    count, less those from that list, the frame's variables (and the module's), the trace's attributes and
    barriers and other proxies (``h.shape`` refers to ``h``), is the number of references from anywhere
    else. Counted exactly or too few, never too many: a reference not accounted for sends the caller to the
    walk, which finds what holds it, as it would without the count.
    """
    live = tracer.proxies
    if not live:
        return {}
    scope = frame.f_locals if frame is not None else {}  # read first: before 3.13 this fills a dict of them
    elsewhere = {id(p): refs - _HELD_BY_LIST for p, refs in zip(live, _refs(live)) if refs != _HELD_BY_LIST}

    def account(values) -> bool:
        """Take the references from ``values`` off; whether any are left to account for."""
        for i in [id(v) for v in values if type(v) is Proxy]:  # a MethodProxy is not listed: not counted
            if i in elsewhere:
                elsewhere[i] -= 1
        return any(elsewhere.values())

    optimized = frame is not None and frame.f_code.co_flags & _CO_OPTIMIZED
    left = any(elsewhere.values())
    if left and _DICT_OF_FRAME and optimized:  # the frame's own reference (or its cell's) to each variable
        code = frame.f_code
        names = {*code.co_varnames, *code.co_cellvars, *code.co_freevars}  # an argument in a cell is in two
        left = account(scope[n] for n in names if n in scope)
    # most traces' values are held by the block's variables alone: a large module scope is looked at last
    sources = [lambda: scope.values(), lambda: vars(tracer).values(), lambda: tracer.saved,
               lambda: [v for b in tracer.barriers for by_invoke in b.rounds.values()
                        for traced in by_invoke.values() for v in traced.values()],
               lambda: [p._owner for p in live]]
    if frame is not None and (optimized or scope is not frame.f_globals):
        sources.append(lambda: frame.f_globals.values())
    for values in sources:
        if not left:
            break
        left = account(values())
    return {i: n for i, n in elsewhere.items() if n}


def _held_at_top(containers: list, elsewhere: dict[int, int]) -> list | None:
    """The ``containers`` that hold the proxies ``elsewhere`` counts as their own items (``acts.append(h)``),
    with those proxies saved, if these are all the references it counts; else ``None``."""
    left = sum(elsewhere.values())
    found = []
    for c in containers:
        if len(c) > _SCAN_LIMIT:
            continue
        hits = [v for v in gc.get_referents(c) if type(v) is Proxy and id(v) in elsewhere]
        if hits:
            found.append((c, hits))
            left -= len(hits)
    if left:
        return None
    for _, hits in found:
        for v in hits:
            if not v.saved:
                v.save()
    return [c for c, _ in found]


def _hold_no_proxies(tracer, containers: list) -> bool:
    """Whether ``containers`` hold none of ``tracer``'s proxies, however deep, found by one walk over all of them
    together within the walk's limits; ``False`` where they hold one, or a container past the limits is met
    (``keep_appended``'s walk then tells which container holds what, and which it walked to the end).

    Most traces put nothing into containers made before them: this answers for all of them with a
    ``gc.get_referents`` call and a few set operations per depth, where the full walk keeps account per
    container (a few microseconds each, at every trace, for every list and dict in the module's globals).
    """
    level, budget = containers, _VISIT_LIMIT
    for _ in range(_DEPTH_LIMIT):
        if not level:
            return True
        # no account of what was looked at: a container reached twice counts twice, and a cycle ends the walk
        # by the budget or the depth (the full walk then answers)
        sizes = list(map(len, level))
        budget -= sum(sizes)
        if budget < 0 or max(sizes) > _SCAN_LIMIT:
            return False
        items = gc.get_referents(*level)
        kinds = list(map(type, items))
        types = set(kinds)
        if types <= _ATOMS:
            return True
        if Proxy in types and any(type(v) is Proxy and v.tracer is tracer for v in items):
            return False
        below = {t for t in types - _ATOMS if issubclass(t, (list, dict, tuple))}
        level = list(compress(items, map(below.__contains__, kinds))) if below else []
    return False


_DEPTH_LIMIT = 32  # depths the one-pass walk goes to before it leaves the answer to the full walk


class _Walk:
    """One container's part of ``keep_appended``'s walk: the containers it reaches at the current depth."""

    __slots__ = ("top", "level", "found", "complete")

    def __init__(self, top: Any):
        self.top, self.found, self.complete = top, False, len(top) <= _SCAN_LIMIT
        self.level = [top] if self.complete else []

    def step(self, tracer, seen: set[int], budget: int) -> int:
        """Look at the elements of this depth's containers, within ``budget`` elements; returns what is left."""
        level = self.level
        sizes = list(accumulate(map(len, level)))
        if sizes[-1] > budget:  # the budget ends inside this level: look at the containers it covers
            level, self.complete = level[:bisect_right(sizes, budget)], False
            if not level:
                self.level = []
                return budget
        budget -= sizes[len(level) - 1]
        items = gc.get_referents(*level)  # a list's and a tuple's items, a dict's keys and values
        kinds = list(map(type, items))
        types = set(kinds)
        if types <= _ATOMS:  # numbers and strings only (a dataset's token lists): nothing below
            self.level = []
            return budget
        if Proxy in types:
            for v in items:
                if type(v) is Proxy and v.tracer is tracer:
                    self.found = True
                    if not v.saved:
                        v.save()
        mutable = {list, dict} | {t for t in types - _WALKED - _ATOMS
                                  if issubclass(t, (list, dict)) and not issubclass(t, SiteContainer)}
        # a tuple, and a module's tuple or dict value (``acts.append(attn.output)``), is rebuilt in what holds
        # it when bound (as a plain tuple or dict of real values): looked into under every holder
        rebuilt = {t for t in types if t is tuple or issubclass(t, SiteContainer)}
        # containers only (a dataset's rows): all of them are looked into
        inner = items if types <= mutable else list(compress(items, map(mutable.__contains__, kinds)))
        if not rebuilt and inner:
            below = _atoms_below(inner, budget)
            if below is not None:  # the walk ends at the next depth: its containers need not be filed as seen
                self.level = []
                return budget - below
        # a list or dict is looked into once (and changed in place)
        by_id = dict(zip(map(id, inner), inner))
        if seen:
            for i in seen.intersection(by_id):
                del by_id[i]
        seen.update(by_id)
        level = list(by_id.values())
        if rebuilt:
            level += compress(items, map(rebuilt.__contains__, kinds))
        small = list(compress(level, map(_SCAN_LIMIT.__ge__, map(len, level))))
        self.complete = self.complete and len(small) == len(level)
        self.level = small
        return budget


def _atoms_below(containers: list, budget: int) -> int | None:
    """How many elements ``containers`` hold, if they hold numbers and strings only and are within the walk's
    limits (a dataset's rows of token lists: tens of thousands of lists at every trace); else ``None``."""
    if not set(map(type, gc.get_referents(containers[0]))) <= _ATOMS:  # the first tells, most often
        return None
    lengths = list(map(len, containers))
    total = sum(lengths)
    if max(lengths) > _SCAN_LIMIT or total > budget:
        return None
    return total if set(map(type, gc.get_referents(*containers))) <= _ATOMS else None


def proxies_in(value: Any, seen: set | None = None, limit: int | None = None) -> list[Proxy]:
    """The proxies in ``value`` and the lists, dicts and tuples it holds, each container looked at once
    (``seen``: ids of containers already looked at; ``limit``: containers longer than this are passed over).

    A session looks through its frame's variables with it at every trace, often lists of token ids:
    numbers and strings are passed over without a call each."""
    seen = set() if seen is None else seen
    out: list[Proxy] = []
    stack = [value]
    while stack:
        v = stack.pop()
        if type(v) in _ATOMS:
            continue
        if isinstance(v, Proxy):
            out.append(v)
        elif isinstance(v, (list, dict, tuple)) and id(v) not in seen and (limit is None or len(v) <= limit):
            seen.add(id(v))
            items = list(v.values()) if isinstance(v, dict) else list(v)
            stack.extend(reversed(items))  # first to last, as the recursion found them
    return out


def _replace_saved(value: Any, seen: dict, registered: set, dropped: Any = ()) -> Any:
    """``value`` with saved proxies replaced by their values; lists and dicts are changed in place, a tuple
    is rebuilt. ``seen`` maps the id of each container done to ``(container, what replaces it)``, so that a
    tuple held in several places is rebuilt once and replaced in all of them (and kept alive, so that no
    new object takes its id)."""
    if isinstance(value, Proxy):
        return value.value if value.value is not _UNSET else value
    if isinstance(value, SiteContainer):  # a module's tuple/dict value becomes a plain one of real values
        items = value.items() if isinstance(value, dict) else enumerate(value)
        new = [(k, _replace_saved(v, seen, registered, dropped)) for k, v in items]
        if isinstance(value, SiteDict):
            return getattr(value, "_bound", SiteDict)(new)  # a ModelOutput is bound as its own class
        return (list if isinstance(value, list) else tuple)(v for _, v in new)
    if not (_is_container(value) or type(value) is tuple):
        return value
    done = seen.get(id(value))
    if done is not None:
        return done[1]
    if len(value) > _SCAN_LIMIT and id(value) not in registered:
        return value
    seen[id(value)] = (value, value)  # a cycle back to it finds it as it is
    if isinstance(value, dict):
        for k, v in value.items():
            new = _replace_saved(v, seen, registered, dropped)
            if new is not v:
                value[k] = new
        return value
    if dropped and isinstance(value, list):  # a value of a generation step that never ran: not appended
        kept = [v for v in value if not (type(v) is Proxy and id(v) in dropped)]
        if len(kept) != len(value):
            value[:] = [_replace_saved(v, seen, registered, dropped) for v in kept]
            return value
    new = [_replace_saved(v, seen, registered, dropped) for v in value]
    if all(a is b for a, b in zip(new, value)):
        return value
    if type(value) is tuple:
        seen[id(value)] = (value, tuple(new))
        return seen[id(value)][1]
    value[:] = new
    return value


def bind_saved(frame, saved: list[Proxy], containers: list[Any] = (), untouched: list[Any] = (),
               dropped: Any = ()) -> None:
    """Replace saved proxies by their values in the variables of the trace's frame.

    ``containers`` (registered with ``fxpatch.save``, or made before the trace and filled in it) get their
    values wherever they are; ``untouched`` (made before the trace, walked to the end by ``keep_appended``
    and found holding none of its values) are not looked through again, and where it is ``None`` no
    container holds one of the trace's values (``keep_appended`` counted), so only the variables bound to
    one change: a notebook's thousands of names are not each looked into.
    """
    registered = {id(c) for c in containers}
    seen: dict = {id(c): (c, c) for c in untouched or () if id(c) not in registered}
    for container in containers:
        _replace_saved(container, seen, registered, dropped)
    if frame is None or not saved:
        return
    local_vars = frame.f_locals
    is_module_level = local_vars is frame.f_globals
    if untouched is None:
        items = [(name, value) for name, value in local_vars.items() if type(value) is Proxy]
    else:
        items = list(local_vars.items())
    changed = {}
    for name, value in items:
        new = _replace_saved(value, seen, registered, dropped)
        if new is not value:
            changed[name] = new
    if not changed:
        return
    for name, new in changed.items():
        local_vars[name] = new
    if sys.version_info < (3, 13) and not is_module_level:
        ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))
