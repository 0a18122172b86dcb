"""Multi-process runs: 2 CPU processes on localhost give the numbers of 1 process.

One pipeline, `configs/ppo.py:test` shrunk (SFT 2 steps, then 2 PPO iterations scored by the
gold reward), runs twice through `python -m rlhf_jax.main`: as 1 process with 4 CPU devices,
and as 2 processes with 2 devices each, connected by `--coordinator_address` (JAX's
distributed runtime, gloo collectives). Both use the mesh fsdp=4, so parameters, optimizer
state and every batch are split across the two processes. The two launches run at the same
time to use both cores of a CI machine.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest  # pylint: disable=g-import-not-at-top
import jax
import numpy as np

from rlhf_jax import artifacts, distributed, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 480
NUM_DEVICES = 4
PIPELINE = [
    "--config=configs/ppo.py:test", "--config.ppo.reward=gold", "--config.ppo.critic=sft",
    "--config.sft.train.num_steps=2", "--config.sft.train.log_every=1",
    "--config.sft.train.eval_every=0", "--config.ppo.num_iterations=2",
    "--config.ppo.data.num_eval_prompts=16", "--config.mesh.data=1", "--config.mesh.fsdp=4",
]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


class _Launch:
  """`num_processes` copies of the pipeline, each with NUM_DEVICES / num_processes CPUs."""

  def __init__(self, workdir: str, num_processes: int):
    self.workdir, self.procs, self.logs = workdir, [], []
    # Compiling is nearly all of these runs' time: LLVM's cheapest settings halve it (both
    # launches compile alike, so the comparison is unaffected).
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
        f"--xla_force_host_platform_device_count={NUM_DEVICES // num_processes} "
        "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"))
    port = _free_port()
    for i in range(num_processes):
      args = [sys.executable, "-m", "rlhf_jax.main", *PIPELINE, f"--workdir={workdir}"]
      if num_processes > 1:
        args += [f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}",
                 f"--process_id={i}"]
      out = open(os.path.join(workdir + f".{i}.out"), "w+")
      err = open(os.path.join(workdir + f".{i}.err"), "w+")
      self.logs.append((out, err))
      self.procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=err))

  def wait(self, deadline: float) -> str | None:
    """None when every process exited 0; else what went wrong, with each one's stderr tail.

    A process that fails leaves its peers waiting in a collective, so they are killed."""
    while time.time() < deadline and any(p.poll() is None for p in self.procs):
      if any(p.poll() not in (None, 0) for p in self.procs):
        break
      time.sleep(0.5)
    problem = None
    if any(p.poll() is None for p in self.procs) and not any(p.poll() for p in self.procs):
      problem = f"timed out after {TIMEOUT_S}s"
    elif any(p.returncode for p in self.procs):
      problem = "a process failed"
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    if problem is None:
      return None
    report = [f"{self.workdir}: {problem}"]
    for i, (p, (_, err)) in enumerate(zip(self.procs, self.logs)):
      err.seek(0)
      report.append(f"--- process {i} (exit {p.returncode}) stderr tail:\n{err.read()[-3000:]}")
    return "\n".join(report)

  def output(self, i: int) -> tuple[str, str]:
    out, err = self.logs[i]
    out.seek(0)
    err.seek(0)
    return out.read(), err.read()


def _metrics(workdir: str):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


class TwoProcessesTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    t0 = time.time()
    cls.one = _Launch(os.path.join(cls.tmp.name, "one"), 1)
    cls.two = _Launch(os.path.join(cls.tmp.name, "two"), 2)
    deadline = t0 + TIMEOUT_S
    problems = [p for p in (cls.two.wait(deadline), cls.one.wait(deadline)) if p]
    cls.wall_s = time.time() - t0
    if problems:
      raise AssertionError("\n\n".join(problems))
    print(f"\n[multihost] both launches finished in {cls.wall_s:.0f}s")

  @classmethod
  def tearDownClass(cls):
    for launch in (cls.one, cls.two):
      for out, err in launch.logs:
        out.close()
        err.close()
    cls.tmp.cleanup()
    super().tearDownClass()

  def _compare(self, stage: str, rtol: float, atol: float):
    rows = {}
    for name, launch in (("one", self.one), ("two", self.two)):
      rows[name] = [r for r in _metrics(launch.workdir) if r["stage"] == stage]
    self.assertEqual([r["step"] for r in rows["one"]], [r["step"] for r in rows["two"]])
    for a, b in zip(rows["one"], rows["two"]):
      self.assertEqual(sorted(a), sorted(b))
      for key in sorted(a):
        if key in ("stage", "step", "tokens_per_s") or key.startswith("time/"):
          continue
        self.assertTrue(np.isclose(a[key], b[key], rtol=rtol, atol=atol),
                        f"{stage} step {a['step']} {key}: 1 process {a[key]!r}, 2 processes "
                        f"{b[key]!r}")
        print(f"[multihost] {stage} step {a['step']} {key}: 1 process {a[key]:.7g}, "
              f"2 processes {b[key]:.7g}, |diff| {abs(a[key] - b[key]):.2g}")
    return rows

  def test_sft_steps_match(self):
    rows = self._compare("sft", rtol=1e-5, atol=1e-6)
    self.assertEqual([r["step"] for r in rows["one"]], [1, 2])

  def test_ppo_iterations_match(self):
    rows = self._compare("ppo", rtol=1e-4, atol=1e-5)
    self.assertEqual([r["step"] for r in rows["one"]], [1, 2, 2])  # two iterations + summary
    for key in ("objective/kl", "loss/policy", "loss/value", "grad_norm", "gold/reward"):
      self.assertIn(key, rows["two"][0])
    self.assertEqual(rows["two"][0]["policy/first_minibatch_ratio"], 1.0)

  def test_checkpoint_written_by_two_processes_restores_in_one(self):
    # This test process is a third, single process; a one-device mesh is a different layout
    # from the writers' fsdp=4 over two processes.
    mesh = sharding.make_mesh({"data": 1, "num_devices": 1})
    one = artifacts.load_policy(os.path.join(self.one.workdir, "sft"), mesh)
    two = artifacts.load_policy(os.path.join(self.two.workdir, "sft"), mesh)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                                         jax.device_get(one.params), jax.device_get(two.params)))
    print(f"[multihost] SFT params after 2 steps, max |1 process - 2 processes| = "
          f"{max(diffs):.3g} over {len(diffs)} arrays")
    self.assertLess(max(diffs), 1e-6)

  def test_only_process_zero_writes(self):
    lines = [r for r in _metrics(self.two.workdir)]
    self.assertLen(lines, len(_metrics(self.one.workdir)))  # one copy, not one per process
    out0, err0 = self.two.output(0)
    out1, err1 = self.two.output(1)
    self.assertIn('"stage": "ppo"', out0)
    self.assertNotIn('"stage": "ppo"', out1)
    self.assertIn("process 0 of 2 (flags): 2 local / 4 global cpu device(s)", err0)
    self.assertIn("memory per device (estimate; mesh data=1 x fsdp=4", err0)
    self.assertNotIn("memory per device", err1)
    self.assertNotIn("[ppo] iter", err1)


class DistributedSetupTest(absltest.TestCase):
  """Flags and environment detection, in this (single) process."""

  def test_single_process_is_a_no_op(self):
    info = distributed.initialize("auto")
    self.assertEqual((info.process_index, info.process_count), (0, 1))
    self.assertEqual(info.launcher, "single process")
    self.assertEqual(sharding.process_block(sharding.make_mesh({"data": -1})), (0, 1))

  def test_bad_flags_name_the_fix(self):
    with self.assertRaisesRegex(ValueError, "needs --num_processes .* and --process_id"):
      distributed.initialize("auto", "localhost:1234")
    with self.assertRaisesRegex(ValueError, "need --coordinator_address"):
      distributed.initialize("auto", num_processes=2, process_id=0)
    with self.assertRaisesRegex(ValueError, "--distributed=off contradicts"):
      distributed.initialize("off", "localhost:1234", 2, 0)
    with self.assertRaisesRegex(ValueError, "choose one of"):
      distributed.initialize("yes")

  def test_launcher_detection(self):
    detect = distributed.detect_launcher
    self.assertIsNone(detect({}))
    # sbatch's batch step: one process, although the allocation has 16 tasks.
    self.assertIsNone(detect({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "16"}))
    self.assertEqual(detect({"SLURM_JOB_ID": "7", "SLURM_PROCID": "3", "SLURM_NTASKS": "16",
                             "SLURM_STEP_NUM_TASKS": "16"}), "slurm")
    self.assertIsNone(detect({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}))
    self.assertEqual(detect({"OMPI_COMM_WORLD_SIZE": "4"}), "open-mpi")
    self.assertIsNone(detect({"TPU_WORKER_HOSTNAMES": "localhost"}))  # a single-host TPU VM
    self.assertEqual(detect({"TPU_WORKER_HOSTNAMES": "t1-w-0,t1-w-1"}), "tpu")
    self.assertEqual(detect({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}),
                     "JAX_COORDINATOR_ADDRESS")

  def test_global_batch_helpers_on_one_process(self):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    x = np.arange(24, dtype=np.int32).reshape(8, 3)
    np.testing.assert_array_equal(sharding.process_rows(mesh, 8), np.arange(8))
    a = sharding.shard_global_batch({"x": x}, mesh)["x"]
    self.assertEqual(a.sharding, sharding.batch_sharding(mesh, 2))
    np.testing.assert_array_equal(sharding.to_host(a), x)


if __name__ == "__main__":
  absltest.main()
