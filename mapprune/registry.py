"""One registry type for attacks, defenses, models and datasets: a name -> object mapping.

Built-in entries register in their package's ``__init__``; a user's own join with the registry's ``register``
decorator (``@ATTACKS.register`` on a class with a ``name``, or ``MODELS.register("mynet", factory)``), or from an
installed package through the registry's entry-point group (``mapprune.attacks``, ``mapprune.defenses``,
``mapprune.models``, ``mapprune.datasets``), which is read once, the first time a name is not found.
"""

import importlib.metadata
from collections.abc import Iterator
from typing import Any

from .errors import MapPruneError, unknown_name


def _a(word: str) -> str:
    return f"an {word}" if word[:1].lower() in "aeiou" else f"a {word}"


class Registry:
    """Names to objects of one ``kind`` ("attack", "model", ...), in registration order.

    ``base``: where set, every entry is a subclass of it with a ``name`` of its own (the class registries);
    ``decorator`` is the name the refusal of anything else gives for the registering function.
    Reads behave as a dict's (``in``, ``[name]``, iteration, ``len``, ``items()``); a lookup that misses first
    loads the entry-point ``group`` (once), and an unknown name is refused with the list of valid ones.
    """

    def __init__(self, kind: str, group: str | None = None, *, base: type | None = None,
                 decorator: str | None = None):
        self.kind, self.group, self.base = kind, group, base
        self.decorator = decorator or f"{kind}s.register"
        self._entries: dict[str, Any] = {}
        self._plugins_loaded = group is None

    # -- registering -----------------------------------------------------------------------------------
    def register(self, name_or_obj=None, obj=None, /):
        """``register(cls)`` (a decorator: the key is ``cls.name``), ``register(name, obj)``, or ``register(name)``
        (a decorator for ``obj``). Returns ``obj``. A name taken by another object is refused."""
        if isinstance(name_or_obj, str):
            if obj is None:
                return lambda o: self.register(name_or_obj, o)
            return self._add(name_or_obj, obj)
        obj = name_or_obj
        name = getattr(obj, "name", None)
        if self.base is not None:
            if not (isinstance(obj, type) and issubclass(obj, self.base)) or name in ("", self.base.name):
                raise MapPruneError(f"{self.decorator} takes {_a(self.base.__name__)} subclass with its own name, "
                                    f"got {obj!r}")
        elif not isinstance(name, str) or not name:
            raise MapPruneError(f"{self.decorator} takes a class with a name attribute, or a name and the object "
                                f"({self.decorator}(name, obj)); got {obj!r}")
        return self._add(name, obj)

    def _add(self, name: str, obj):
        if self.base is not None and not (isinstance(obj, type) and issubclass(obj, self.base) and obj.name == name):
            raise MapPruneError(f"{self.decorator} takes {_a(self.base.__name__)} subclass registered under its own "
                                f"name, got {name!r}: {obj!r}")
        if not name or not isinstance(name, str):
            raise MapPruneError(f"{_a(self.kind)} name must be a non-empty string, got {name!r}")
        old = self._entries.get(name, obj)
        if old is not obj:
            where = getattr(old, "__module__", None) or type(old).__module__
            raise MapPruneError(f"{_a(self.kind)} named {name!r} is registered already ({where}); give yours another "
                                "name")
        self._entries[name] = obj
        return obj

    def load_plugins(self) -> None:
        """Registers what installed packages declare under the entry-point group (once): a class registry takes each
        loaded class under its ``name``, the others each object under the entry point's name."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in importlib.metadata.entry_points(group=self.group):
            try:
                loaded = ep.load()
                if self.base is not None:
                    self.register(loaded)
                else:
                    self.register(ep.name, loaded)
            except Exception as e:  # a broken plugin names itself instead of breaking every command
                raise MapPruneError(f"the {self.kind} plugin {ep.name!r} ({ep.value}) failed to load: {e}") from None

    # -- reading -----------------------------------------------------------------------------------------
    def get(self, name: str):
        """The entry ``name`` (loading the entry-point plugins on a miss); an unknown name is refused, listing the
        valid ones."""
        if name not in self:
            raise unknown_name(self.kind, name, self._entries)
        return self._entries[name]

    def create(self, name: str, *args, **kw):
        """``get(name)(*args, **kw)``."""
        return self.get(name)(*args, **kw)

    def names(self) -> list[str]:
        """Every registered name (plugins included), in registration order."""
        self.load_plugins()
        return list(self._entries)

    def __contains__(self, name) -> bool:
        if name not in self._entries and not self._plugins_loaded:
            self.load_plugins()
        return name in self._entries

    def __getitem__(self, name: str):
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self):
        return self._entries.keys()

    def values(self):
        return self._entries.values()

    def items(self):
        return self._entries.items()

    def pop(self, name: str, *default):
        """Removes ``name`` (unregistering a plugin); returns its entry, or ``default`` when it is absent."""
        return self._entries.pop(name, *default)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"

