"""Probability calibration: temperature scaling fitted on held-out logits, and the ECE that measures it.

A bundle's ``model.json`` may hold ``"calibration": {"method": "temperature", "temperature": T, ...}``.
Every prediction path divides the logits by ``T`` before the softmax (eager and the exported graph
alike), so the argmax and accuracy never change, only how confident the probabilities are
(Guo et al. 2017, "On Calibration of Modern Neural Networks").
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imgclf.core.errors import BundleError

log = logging.getLogger("imgclf")

# Equal-width confidence bins for the expected calibration error and the reliability diagram.
ECE_BINS = 15

# A temperature outside this range means the fit failed or the file was edited by hand.
T_MIN, T_MAX = 0.01, 100.0

METHODS = ("temperature", "none")

# Fewer held-out images than this give a temperature that follows noise, not the model.
MIN_IMAGES = 20


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE: the image-weighted mean |accuracy - confidence| over ``n_bins`` equal-width bins."""
    probs = np.asarray(probs, dtype=np.float64)
    if len(probs) == 0:
        return float("nan")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # right=True puts confidence c in the bin (edges[b], edges[b+1]].
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = which == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def _as_two_columns(logits: torch.Tensor) -> torch.Tensor:
    # A single-logit head is the 2-class softmax over [0, z]: scaling z by 1/T scales both.
    return torch.cat([torch.zeros_like(logits), logits], 1) if logits.shape[1] == 1 else logits


def fit_temperature(logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """The temperature minimising the negative log-likelihood of ``labels`` (LBFGS on log T).

    ``logits`` may be raw logits or log-probabilities (softmax is shift-invariant per row). T=1
    is the starting point, so the fitted NLL is never worse than the uncalibrated one.
    """
    z = _as_two_columns(torch.as_tensor(logits, dtype=torch.float64).detach())
    y = torch.as_tensor(labels, dtype=torch.int64)
    if len(z) == 0:
        return 1.0
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        base = float(F.cross_entropy(z, y))
        opt.step(closure)
    t = float(log_t.detach().exp().clamp(T_MIN, T_MAX))
    if not math.isfinite(t) or float(F.cross_entropy(z / t, y)) > base:
        return 1.0
    return t


def fit_calibration(logits: np.ndarray | torch.Tensor, labels: np.ndarray, *, fit_on: str) -> dict[str, Any]:
    """Fit T on held-out ``logits`` (or log-probabilities) and return the ``calibration`` record.

    When the fitted T would raise the ECE on these images (seen on models near chance and on tiny
    sets: the fit lowers the log-loss, not the calibration error), T=1 is kept and logged.
    """
    z = _as_two_columns(torch.as_tensor(logits, dtype=torch.float64))
    y = np.asarray(labels)
    t = fit_temperature(z, y)
    before = expected_calibration_error(torch.softmax(z, 1).numpy(), y)
    after = expected_calibration_error(torch.softmax(z / t, 1).numpy(), y)
    if after > before:
        log.info("calibration: temperature %.3f would raise the ECE on %s (%.4f -> %.4f); kept T=1",
                 t, fit_on, before, after)  # fmt: skip
        t, after = 1.0, before
    else:
        log.info("calibration: temperature %.3f fitted on %d images of %s (ECE %.4f -> %.4f)",
                 t, len(y), fit_on, before, after)  # fmt: skip
    return calibration_record(t, fit_on=fit_on, n=len(y), ece_before=before, ece_after=after)


def uncalibrate(probs: np.ndarray, temperature: float) -> np.ndarray:
    """The probabilities before temperature scaling: softmax(z) is proportional to softmax(z/T)**T."""
    if temperature == 1.0:
        return probs
    p = np.power(np.clip(np.asarray(probs, dtype=np.float64), 1e-300, None), temperature)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def log_probs(probs: np.ndarray) -> np.ndarray:
    """Per-row log-probabilities, usable as logits by :func:`fit_temperature`."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-300, None))


def calibration_record(
    temperature: float, *, fit_on: str, n: int, ece_before: float, ece_after: float
) -> dict[str, Any]:
    """The ``calibration`` block of ``model.json``."""
    return {
        "method": "temperature",
        "temperature": float(temperature),
        "fit_on": fit_on,
        "n_images": int(n),
        "ece_uncalibrated": float(ece_before),
        "ece": float(ece_after),
    }


def check_calibration(meta: dict[str, Any], where: str) -> float:
    """The temperature recorded in ``model.json`` (1.0 when there is none), or a BundleError."""
    cal = meta.get("calibration")
    if cal is None:
        return 1.0
    if not isinstance(cal, dict) or cal.get("method") not in METHODS:
        raise BundleError(
            f"{where}: 'calibration' must be {{'method': 'temperature', 'temperature': T}}; "
            "refit it with `imgclf calibrate` or delete the block"
        )
    if cal["method"] == "none":
        return 1.0
    t = cal.get("temperature")
    number = isinstance(t, int | float) and not isinstance(t, bool)
    if not (number and math.isfinite(t) and T_MIN <= t <= T_MAX):
        raise BundleError(
            f"{where}: calibration.temperature={t!r}; expected a number in [{T_MIN}, {T_MAX}]. "
            "Refit it with `imgclf calibrate` or delete the block"
        )
    return float(t)
