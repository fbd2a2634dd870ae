"""Counts XLA backend compiles by function name, for "no recompile" tests.

A jitted function's own `_cache_size()` is not a reliable witness: its C++ dispatch cache
is an LRU shared with every jitted function that has static arguments, so in a long test
process an entry may be evicted (and re-added from the Python-level cache) without any
compile. A backend compile is what a user pays for, so that is what we count.
"""

import contextlib

import jax

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def backend_compiles():
  """Yields a list that collects the name of every backend compile in the block
  ("jit(generate)" for a jitted `generate`)."""
  names = []

  def listener(event, duration_secs, **kwargs):
    del duration_secs
    if event == _BACKEND_COMPILE:
      names.append(kwargs.get("fun_name"))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
