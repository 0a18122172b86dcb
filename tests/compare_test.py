"""The comparison command's pieces that need no training: overrides, matched budgets, the
up-front check, and the table (the end-to-end run is README's measured table)."""

import importlib.util
import os

from absl.testing import absltest

from rlhf_jax import compare, config as config_lib

_PATH = os.path.join(os.path.dirname(__file__), "..", "configs", "compare.py")
_SPEC = importlib.util.spec_from_file_location("compare_config", _PATH)
compare_config = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(compare_config)


def _cmp(preset="", **keys):
  cmp = compare_config.get_config(preset)
  cmp.update(keys)
  return cmp


class CompareTest(absltest.TestCase):

  def test_parse_overrides(self):
    self.assertEqual(compare.parse_overrides("data.task=arithmetic; grpo.beta=0.1;;n=(1, 2)"),
                     {"data.task": "arithmetic", "grpo.beta": 0.1, "n": (1, 2)})
    with self.assertRaisesRegex(ValueError, "'data.task' is not key=value"):
      compare.parse_overrides("data.task")

  def test_matched_response_budget(self):
    cmp = _cmp()
    for name in config_lib.RL_STAGES:
      cfg = compare.algorithm_config(cmp, name)
      per_iter = compare.responses_per_iteration(cfg, name)
      self.assertEqual(per_iter, 64, name)  # every default samples 64 per iteration
      self.assertEqual(cfg[name].num_iterations * per_iter, cmp.num_responses, name)

  def test_overrides_reach_the_runs_that_have_the_section(self):
    cmp = _cmp("test", overrides="data.task=arithmetic;grpo.reward=gold;dpo.beta=1")
    grpo = compare.algorithm_config(cmp, "grpo")
    self.assertEqual((grpo.data.task, grpo.grpo.reward), ("arithmetic", "gold"))
    dpo = compare.algorithm_config(cmp, "dpo")
    self.assertEqual(dpo.dpo.beta, 1.0)
    self.assertIsInstance(dpo.dpo.beta, float)  # typed as the key it sets
    self.assertNotIn("grpo", compare.algorithm_config(cmp, "ppo"))

  def test_bad_input_is_refused_before_training(self):
    with self.assertRaisesRegex(ValueError, "no run's config has a section for 'critic.x'"):
      compare.check(_cmp("test", overrides="critic.x=1"))
    with self.assertRaisesRegex(ValueError, "algorithms has 'sft'"):
      compare.check(_cmp("test", algorithms=("sft",)))
    with self.assertRaisesRegex(ValueError, "dpo.beta must be positive"):
      compare.check(_cmp("test", overrides="dpo.beta=0"))
    compare.check(_cmp("test"))

  def test_markdown_table(self):
    row = dict(algorithm="grpo", sft_gold_reward=0.1, gold_reward=0.5, kl=2.0, sft_rm_score=0.0,
               rm_score=1.5, responses_sampled=2560, tokens_sampled=40000, wall_s=90.0,
               peak_rss_bytes=2**30, reused=False)
    bon = dict(row, algorithm="best_of_n", tokens_sampled=None, reused=True, rm_score=None)
    table = compare.markdown([row, bon], {"wall_s": 300.0, "peak_rss_bytes": 2**31,
                                          "reused": False})
    self.assertIn("| grpo | 0.100 → 0.500 | 2.00 | 0.00 → 1.50 | 1.5 min | 1.00 GiB | "
                  "2,560 / 40,000 |", table)
    self.assertIn("| best_of_n | 0.100 → 0.500 | 2.00 | 0.00 → – | reused | – | 2,560 / – |",
                  table)
    self.assertIn("trained once for all: 5.0 min, peak RSS 2.00 GiB", table)


if __name__ == "__main__":
  absltest.main()
