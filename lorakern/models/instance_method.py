"""Methods lorakern installs on one model instance (``model.save_pretrained``, generate's static-cache
builder), held weakly.

A bound method stored on the instance would make a reference cycle (model -> method -> model), so a model
(1 GB for a quantized Gemma 3 270M) would outlive its last reference until the cyclic garbage collector
happened to run. :class:`InstanceMethod` holds the model weakly; a deep copy or an unpickled copy of the model
gets one bound to the copy (a shallow ``copy.copy`` shares the original's).
"""
from __future__ import annotations

import weakref
from typing import Callable

from torch import nn

__all__ = ["InstanceMethod"]


class InstanceMethod:
    """``fn`` bound weakly to ``model``: calling it calls ``fn(model, *args, **kwargs)``.

    Raises (when called):
        ReferenceError: the model no longer exists.
    """

    def __init__(self, fn: Callable, model: nn.Module):
        self.fn = fn
        self._model = weakref.ref(model)
        self.__doc__ = fn.__doc__

    @property
    def model(self) -> nn.Module | None:
        """The model this method is bound to (None once it is gone)."""
        return self._model()

    def __call__(self, *args, **kwargs):
        model = self._model()
        if model is None:
            raise ReferenceError(f"the model this {self.fn.__name__} belonged to no longer exists")
        return self.fn(model, *args, **kwargs)

    def __deepcopy__(self, memo):
        model = self._model()
        return InstanceMethod(self.fn, memo.get(id(model), model))

    def __reduce__(self):
        # pickled with the model it belongs to (pickle keeps the cycle); a weak reference cannot be pickled
        return InstanceMethod, (self.fn, self._model())
