"""The statistics and the arithmetic of benchmarks/ab.py (pure functions: tests/test_bench.py).

    paired(a, b)          per-round ratios a[i] / b[i]: median, quartiles, IQR, mean, max
    outliers(times, 3.0)  the rounds slower than 3x their median
    forward_equivalents(mode, k, m)
                          one image's model arithmetic in forward-equivalents (a backward
                          counts 2), on the learner and on the rollout workers
"""

import statistics


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default, 'linear')."""
    s = sorted(values)
    if not s:
        raise ValueError("quantile of no values")
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(values: list[float]) -> dict:
    """median, quartiles, IQR, mean, min, max of `values`."""
    q25, q75 = quantile(values, 0.25), quantile(values, 0.75)
    return {"n": len(values), "median": statistics.median(values), "q25": q25, "q75": q75, "iqr": q75 - q25,
            "mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def paired(a: list[float], b: list[float]) -> dict:
    """The per-round ratios a[i] / b[i] (the same round: the same load on both) and their summary."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired ratios need two equal, non-empty lists of rounds (got {len(a)} and {len(b)})")
    ratios = [x / y for x, y in zip(a, b)]
    return {**summary(ratios), "ratios": ratios}


def outliers(times: list[float], factor: float = 3.0) -> list[int]:
    """Indices of the rounds above `factor` x the median of `times`."""
    med = statistics.median(times)
    return [i for i, t in enumerate(times) if t > factor * med]


# -- arithmetic ------------------------------------------------------------------------------
# One forward of the denoiser on one latent = 1; its backward = 2 (grads of activations and of
# the trained weights; with LoRA the frozen base's weight grads are not formed, so 2 is an upper
# bound there). Contexts (cached), the VAE (cached latents for SFT) and the optimizer are not
# counted: they are what the measured ratio's overhead over this count is made of.

MODES = ("sft", "colocated", "disaggregated", "async", "async_rollout")


def forward_equivalents(mode: str, k: int, m: int | None = None) -> dict:
    """One image's arithmetic: {"learner", "rollout", "total", "states", "per_state"}.

    k roll-out states, m of them trained (None: all k). SFT: one noised state, forward +
    backward. colocated: the roll-out's student forward IS the trained forward (k forwards,
    m of them with a backward) + m teacher forwards. disaggregated / async: a rollout worker
    rolls out (k forwards) and the learner forwards the m trained states again, with
    backward, + m teacher forwards on the learner (async_rollout: on the worker).
    """
    m = k if m is None else m
    if not 1 <= m <= k:
        raise ValueError(f"trained states m={m} must be in 1..k={k}")
    if mode == "sft":
        learner, rollout, states = 3, 0, 1
    elif mode == "colocated":
        learner, rollout, states = k + 2 * m + m, 0, m
    elif mode in ("disaggregated", "async"):
        learner, rollout, states = 3 * m + m, k, m
    elif mode == "async_rollout":
        learner, rollout, states = 3 * m, k + m, m
    else:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    total = learner + rollout
    return {"learner": learner, "rollout": rollout, "total": total, "states": states, "per_state": total / states}
