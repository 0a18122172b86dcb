"""Named registries: algorithm pieces are chosen by a config string, and a wrong name is one
clear error listing the choices.

    ADVANTAGES = Registry("ppo.advantage_estimator")

    @ADVANTAGES.register("gae")
    def gae(...): ...

    ADVANTAGES.get(config.ppo.advantage_estimator)
"""

from __future__ import annotations

from typing import Callable


class Registry:

  def __init__(self, key: str):
    self.key = key  # the config key that chooses from it, named in errors
    self._fns: dict[str, Callable] = {}

  def register(self, name: str):
    def add(fn: Callable) -> Callable:
      if name in self._fns:
        raise ValueError(f"{self.key}: {name!r} is registered twice.")
      self._fns[name] = fn
      return fn
    return add

  def names(self) -> tuple[str, ...]:
    return tuple(sorted(self._fns))

  def check(self, name: str) -> None:
    if name not in self._fns:
      raise ValueError(f"{self.key} is {name!r}; choose one of {self.names()}.")

  def get(self, name: str) -> Callable:
    self.check(name)
    return self._fns[name]

  def __contains__(self, name: str) -> bool:
    return name in self._fns
