"""The functional forms of reward over-optimisation (Gao, Schulman & Hilton 2022), fitted.

With d = sqrt(KL(pi || pi_SFT)) in sqrt-nats and R the gold reward minus the SFT policy's
(so every curve starts at R(0) = 0):

    best-of-N   R_bon(d) = d (alpha - beta d)
    RL          R_rl(d)  = d (alpha - beta log d)

Both are linear in (alpha, beta), so the least-squares fit is exact linear algebra
(`numpy.linalg.lstsq` on the basis [d, -d^2] or [d, -d log d]), no optimiser and no
starting point. A fit reports R^2 and, when beta > 0, the peak: best-of-N at
d* = alpha / (2 beta), R* = alpha^2 / (4 beta); RL where dR/dd = alpha - beta (log d + 1) = 0,
d* = exp(alpha / beta - 1), R* = beta d*. beta <= 0 means no peak in the data's form (the
gold reward still rising): `peak_kl` is None.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

FORMS = ("bon", "rl")


def _basis(form: str, d: np.ndarray) -> np.ndarray:
  if form == "bon":
    return np.stack([d, -d * d], axis=1)
  if form == "rl":
    d_log_d = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)  # -> 0 as d -> 0
    return np.stack([d, -d_log_d], axis=1)
  raise ValueError(f"fit form is {form!r}; choose one of {FORMS}.")


@dataclasses.dataclass(frozen=True)
class Fit:
  form: str
  alpha: float
  beta: float
  r2: float  # of the gold rewards the fit explains (1 - SS_res / SS_tot about their mean)
  num_points: int
  peak_kl: float | None  # KL (nats) where the fitted gold peaks; None: no peak (beta <= 0)
  peak_gold: float | None  # the fitted gold reward there (relative to SFT)

  def predict(self, kl) -> np.ndarray:
    d = np.sqrt(np.asarray(kl, np.float64))
    return _basis(self.form, d) @ np.array([self.alpha, self.beta])

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _peak(form: str, alpha: float, beta: float) -> tuple[float | None, float | None]:
  if beta <= 0:
    return None, None
  if form == "bon":
    d = alpha / (2 * beta)
    return (d * d, alpha * alpha / (4 * beta)) if d > 0 else (None, None)
  exponent = alpha / beta - 1
  if exponent > 700:  # exp overflows: the peak is beyond any KL a run reaches
    return None, None
  d = math.exp(exponent)
  return d * d, beta * d


def fit(form: str, kl, gold) -> Fit:
  """Least-squares (alpha, beta) of `form` to points (KL in nats, gold relative to SFT)."""
  kl = np.asarray(kl, np.float64)
  gold = np.asarray(gold, np.float64)
  if kl.shape != gold.shape or kl.ndim != 1:
    raise ValueError(f"fit: kl and gold must be 1-D of one length, got {kl.shape} and "
                     f"{gold.shape}.")
  if np.any(kl < 0) or not np.all(np.isfinite(kl)) or not np.all(np.isfinite(gold)):
    raise ValueError("fit: KL values must be finite and >= 0 and gold rewards finite.")
  if np.count_nonzero(kl > 0) < 2:
    raise ValueError(f"fit: need at least 2 points with KL > 0 to fit {form!r}, got "
                     f"{np.count_nonzero(kl > 0)}.")
  basis = _basis(form, np.sqrt(kl))
  (alpha, beta), *_ = np.linalg.lstsq(basis, gold, rcond=None)
  residual = gold - basis @ np.array([alpha, beta])
  total = ((gold - gold.mean()) ** 2).sum()
  r2 = 1.0 - (residual ** 2).sum() / total if total > 0 else float("nan")
  peak_kl, peak_gold = _peak(form, float(alpha), float(beta))
  return Fit(form, float(alpha), float(beta), float(r2), len(kl), peak_kl, peak_gold)
