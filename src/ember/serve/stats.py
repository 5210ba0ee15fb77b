"""Per model-version statistics, in the shape of Triton's statistics extension.

Updated only on the event loop thread, so no locks. The same numbers feed the statistics
endpoints and the Triton-compatible `nv_inference_*` Prometheus counters.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += max(0, ns)

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelStats:
    name: str
    version: str
    last_inference_ms: int = 0
    inference_count: int = 0  # batch items served successfully
    execution_count: int = 0  # engine runs
    success: Duration = field(default_factory=Duration)  # end-to-end time of successful requests
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    failures: Counter = field(default_factory=Counter)  # reason -> count
    batches: dict[int, BatchStats] = field(default_factory=dict)

    def record_batch(self, size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        self.execution_count += 1
        b = self.batches.setdefault(size, BatchStats())
        b.compute_input.add(input_ns)
        b.compute_infer.add(infer_ns)
        b.compute_output.add(output_ns)

    def record_success(self, items: int, total_ns: int, queue_ns: int, input_ns: int, infer_ns: int,
                       output_ns: int) -> None:
        self.last_inference_ms = int(time.time() * 1000)
        self.inference_count += items
        self.success.add(total_ns)
        self.queue.add(queue_ns)
        self.compute_input.add(input_ns)
        self.compute_infer.add(infer_ns)
        self.compute_output.add(output_ns)

    def record_failure(self, reason: str, total_ns: int) -> None:
        self.fail.add(total_ns)
        self.failures[reason] += 1

    def as_dict(self) -> dict[str, Any]:
        """Triton's JSON statistics entry for this version."""
        zero = Duration().as_dict()
        return {
            "name": self.name,
            "version": self.version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.as_dict(), "fail": self.fail.as_dict(), "queue": self.queue.as_dict(),
                "compute_input": self.compute_input.as_dict(), "compute_infer": self.compute_infer.as_dict(),
                "compute_output": self.compute_output.as_dict(), "cache_hit": zero, "cache_miss": zero,
            },
            "batch_stats": [
                {"batch_size": size, "compute_input": b.compute_input.as_dict(),
                 "compute_infer": b.compute_infer.as_dict(), "compute_output": b.compute_output.as_dict()}
                for size, b in sorted(self.batches.items())
            ],
            "memory_usage": [],
        }
