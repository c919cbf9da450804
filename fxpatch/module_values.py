"""A module's value inside a trace, when it is a tuple, list or dict of tensors.

``model.transformer.h[0].attn.output`` is a ``SiteTuple`` of proxies:
indexing gives each element, ``out[0] = v`` writes that element into the
model, and ``.save()`` keeps every element.
"""

from __future__ import annotations

from typing import Any

from .errors import FxpatchError, user_location
from .proxy import Proxy
from .structure import Spec, flatten


class SiteContainer:
    def save(self):
        """Save every traced value inside; after the trace this holds real values."""
        leaves, _ = flatten(self)
        for _, leaf in leaves:
            if isinstance(leaf, Proxy) and not leaf.saved:
                leaf.save()
        return self


class SiteTuple(SiteContainer, tuple):
    """A module's tuple output inside a trace; ``out[i] = v`` writes element ``i``."""

    def __setitem__(self, index, value):
        write_element(self[index], value)


class SiteList(SiteContainer, list):
    """A module's list output inside a trace; ``out[i] = v`` writes element ``i``."""

    def __setitem__(self, index, value):
        write_element(self[index], value)
        super().__setitem__(index, value)


class SiteDict(SiteContainer, dict):
    """A module's dict / ``ModelOutput`` inside a trace: ``out.logits``, ``out['logits']``, ``out[0]``."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"this output has no field {name!r}; it has {list(self)}") from None

    def __getitem__(self, key):
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__(key)

    def __setitem__(self, key, value):
        write_element(self[key], value)
        super().__setitem__(key if not isinstance(key, int) else list(self)[key], value)

    __setattr__ = __setitem__


def write_element(current, value):
    if isinstance(current, Proxy) and current.site is not None:
        current.tracer.write_site(current.site, value)
        return
    raise FxpatchError("this element of the module's value is not a tensor the model uses, so it cannot be set",
                       at=user_location(), hint="Assign to a tensor element instead.")


def build_container(spec: Spec, items: list) -> Any:
    if spec.kind == "dict":
        return SiteDict(zip(spec.keys, items))
    return SiteList(items) if spec.kind == "list" else SiteTuple(items)
