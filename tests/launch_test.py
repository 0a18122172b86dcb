"""Launchers in launch/: the Colab notebook (valid nbformat; its configuration cell runs on
CPU), the TPU-VM pod script (commands checked in dry-run mode) and the SLURM batch script
(run against a stand-in `srun` that prints its command line)."""

import os
import re
import shlex
import subprocess
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest  # pylint: disable=g-import-not-at-top
import nbformat

from rlhf_jax import config as config_lib, scale

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")


def _python_of(cell_source: str) -> str:
  """IPython shell (`!cmd`) and magic (`%cd`) lines become `pass`, indentation kept."""
  return "\n".join(re.sub(r"^(\s*)[!%].*$", r"\1pass", line)
                   for line in cell_source.splitlines())


def _overrides(flags: list[str]) -> dict[str, str]:
  return dict(f[len("--config."):].split("=", 1) for f in flags if f.startswith("--config."))


class ColabNotebookTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.nb = nbformat.read(os.path.join(LAUNCH, "colab_tpu.ipynb"), as_version=4)
    self.cells = {tag: c for c in self.nb.cells if c.cell_type == "code"
                  for tag in c.metadata.get("tags", [])}

  def test_valid_notebook_with_the_steps(self):
    nbformat.validate(self.nb)
    self.assertEqual(self.nb.metadata["accelerator"], "TPU")
    self.assertContainsSubset(["install", "config", "run", "summary"], self.cells)
    self.assertIn('pip install -q -e ".[tpu]"', self.cells["install"].source)
    run = self.cells["run"].source
    self.assertIn("python -m rlhf_jax.main --config=configs/ppo.py:{PRESET} {FLAGS}", run)
    for cell in self.nb.cells:
      if cell.cell_type == "code":
        compile(_python_of(cell.source), "<cell>", "exec")  # every cell is valid Python

  def test_configuration_cell_runs_on_cpu(self):
    namespace = {}
    exec(compile(_python_of(self.cells["config"].source), "config cell", "exec"), namespace)  # pylint: disable=exec-used
    self.assertEqual(namespace["PRESET"], "test")  # no TPU here: the CPU fallback
    config = namespace["config"]
    self.assertEqual(config_lib.stages_of(config), ("sft", "rm", "ppo"))
    # The command-line flags it prints set the same keys on a fresh config (keys are locked).
    flags = shlex.split(namespace["FLAGS"])
    fresh = scale.apply_overrides(config_lib.ppo_config("test"),
                                  {k: int(v) for k, v in _overrides(flags).items()})
    self.assertEqual(fresh.to_dict(), config.to_dict())
    self.assertEqual(config.mesh.data, -1)  # the one mesh of every stage


class TpuPodScriptTest(absltest.TestCase):

  def _run(self, *args, **env):
    return subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), *args],
                          env=dict(os.environ, **env), capture_output=True, text=True,
                          timeout=60, check=False)

  def test_dry_run_drives_every_worker(self):
    out = self._run("configs/ppo.py:7b-v4-32", "--config.ppo.num_iterations=3", TPU_NAME="pod",
                    ZONE="us-central2-b", WORKDIR="/mnt/shared/run", DRY_RUN="1")
    self.assertEqual(out.returncode, 0, out.stderr)
    lines = out.stdout.strip().splitlines()
    gcloud = [shlex.split(line) for line in lines if line.startswith("gcloud")]
    self.assertLen(gcloud, 4)  # copy, unpack, install, run
    for cmd in gcloud:
      self.assertEqual(cmd[:4], ["gcloud", "compute", "tpus", "tpu-vm"])
      self.assertIn("--worker=all", cmd)
      self.assertIn("--zone=us-central2-b", cmd)
    self.assertEqual(gcloud[0][4], "scp")
    self.assertIn("pip install -q -e '.[tpu]'", gcloud[2][-1])
    run = next(a for a in gcloud[3] if a.startswith("--command="))
    remote = shlex.split(run[len("--command="):])
    self.assertContainsSubset(["python3", "-m", "rlhf_jax.main", "--config=configs/ppo.py:7b-v4-32",
                               "--workdir=/mnt/shared/run", "--distributed=on",
                               "--config.ppo.num_iterations=3"], remote)

  def test_missing_settings_are_named(self):
    out = self._run("configs/ppo.py:7b-v4-32", DRY_RUN="1", ZONE="z", WORKDIR="/w")
    self.assertNotEqual(out.returncode, 0)
    self.assertIn("TPU_NAME", out.stderr)


class SlurmScriptTest(absltest.TestCase):

  def _run(self, *args, **env):
    with tempfile.TemporaryDirectory() as bin_dir:
      srun = os.path.join(bin_dir, "srun")
      with open(srun, "w") as f:
        f.write('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
      os.chmod(srun, 0o755)
      env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", **env)
      out = subprocess.run(["bash", os.path.join(LAUNCH, "slurm_gpu.sbatch"), *args], env=env,
                           capture_output=True, text=True, timeout=60, check=False)
    self.assertEqual(out.returncode, 0, out.stderr)
    return out.stdout.strip().splitlines()[1:]  # after the banner: srun's argv, one a line

  def test_batch_header_and_one_process_per_gpu(self):
    with open(os.path.join(LAUNCH, "slurm_gpu.sbatch")) as f:
      text = f.read()
    for directive in ("--ntasks-per-node=8", "--gpus-per-node=8"):
      self.assertIn(f"#SBATCH {directive}", text)
    argv = self._run("configs/sft.py:1b-8gpu", SLURM_JOB_NUM_NODES="1", WORKDIR="/shared/w")
    self.assertEqual(argv[:5], ["--kill-on-bad-exit=1", "python", "-m", "rlhf_jax.main",
                                "--config=configs/sft.py:1b-8gpu"])
    self.assertEqual(_overrides(argv), {})  # one node: the preset's own mesh

  def test_nodes_split_the_batch_gpus_shard_the_weights(self):
    argv = self._run("configs/ppo.py:7b-8gpu", "--config.ppo.num_iterations=3",
                     SLURM_JOB_NUM_NODES="4", SLURM_NTASKS_PER_NODE="8")
    overrides = _overrides(argv)
    self.assertEqual(overrides.pop("ppo.num_iterations"), "3")
    cfg = scale.apply_overrides(config_lib.ppo_config("7b-8gpu"),
                                {k: int(v) for k, v in overrides.items()})
    self.assertEqual(config_lib.stages_of(cfg), ("sft", "rm", "ppo"))
    self.assertEqual((cfg.mesh.data, cfg.mesh.fsdp), (4, 8))  # the one mesh of every stage


class ReadmeTest(absltest.TestCase):

  def test_launchers_are_documented_with_their_meshes(self):
    with open(os.path.join(REPO, "README.md")) as f:
      readme = f.read()
    for name in ("launch/colab_tpu.ipynb", "launch/tpu_pod.sh", "launch/slurm_gpu.sbatch",
                 "--coordinator_address", "python -m rlhf_jax.memory"):
      self.assertIn(name, readme)
    for size, target in scale.TUNED:
      self.assertIn(f"`{size}-{target}`", readme)


if __name__ == "__main__":
  absltest.main()
