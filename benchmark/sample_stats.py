"""The summary every GPU benchmark here reports for a list of timed samples (seconds)."""

import statistics


def summary(samples: list[float]) -> dict:
    """Median, min, max and count: medians because the machines are shared and noisy."""
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "n": len(samples),
    }
