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


# The slowest test classes first (measured with --durations). With `-n 2 --dist loadscope
# --no-loadscope-reorder` (the README's command) the workers take whole classes in this
# order, so the short ones fill in at the end: scheduled last, a 40 s class left one worker
# idle while the other finished it (xdist's own reorder puts classes with many tests first).
_SLOW_FIRST = ("multihost_test", "config_test::SharedKeysTest", "ppo_test::MoePpoTest",
               "config_test", "lab_test::LabRunTest", "ppo_test", "lora_test::LoraPpoTest",
               "dpo_test", "grpo_test", "sft_test", "lora_test", "moe_test", "pretrained_test")


def pytest_collection_modifyitems(items):
  def rank(item):
    file = os.path.splitext(os.path.basename(str(item.fspath)))[0]
    name = f"{file}::{item.cls.__name__}" if item.cls else file
    for i, prefix in enumerate(_SLOW_FIRST):
      if name == prefix or name.startswith(prefix + "::") or file == prefix:
        return i
    return len(_SLOW_FIRST)
  items.sort(key=rank)  # stable: the order within a class is kept
