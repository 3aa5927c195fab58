"""onnxruntime latency of ONNX files, measured the way a user runs them (default session options, except the
thread count when one is given), several files in one run so that they share the machine's state."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence

import numpy as np

from graphpress import kv_cache
from graphpress.lowering.onnx import ort_session

ROUNDS = 4


def latencies(paths: Sequence[str | os.PathLike[str]], feeds: Sequence[dict[str, np.ndarray]], threads: int,
              runs: int, warmup: int, rounds: int = ROUNDS) -> list[dict[str, float]]:
    """Latency of every file in ``rounds`` rounds of ``runs / rounds`` timed runs each, files in turn, so that a
    slow spell of the machine falls on all of them alike. Only one session lives at a time: onnxruntime's
    worker threads spin after a run, and an idle session's spinning threads measured 0.43x -> 0.55x on the
    2-core machine when sessions were interleaved run by run."""
    times: list[list[float]] = [[] for _ in paths]
    per_round = -(-runs // rounds)
    for r in range(rounds):
        for k in range(len(paths)):
            i = (r + k) % len(paths)
            session = ort_session(paths[i], threads)
            feed = kv_cache.complete_feed(feeds[i], session.get_inputs())  # a causal LM's whole sequence
            for _ in range(warmup):
                session.run(None, feed)
            for _ in range(per_round):
                t = time.perf_counter()
                session.run(None, feed)
                times[i].append((time.perf_counter() - t) * 1e3)
            del session
    return [{"median_ms": statistics.median(t), "min_ms": min(t), "runs": len(t), "threads": threads}
            for t in times]
