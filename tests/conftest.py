"""Test-process setup, applied before any test imports JAX.

* 8 fake CPU devices, so sharded code runs on meshes like (2, 2, 2, 1).
* A persistent compilation cache for this pytest session: several tests run the same
  tiny stage more than once (resume, entry point), and identical programs then compile once.
  Subprocesses inherit it through the environment.
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      tempfile.mkdtemp(prefix="rlhf_jax_test_jit_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
