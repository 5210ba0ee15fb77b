"""Before the timing run: which Triton kernels it will launch, compiled ahead in worker processes.

The tuner times one node at a time on the GPU, but compiling the template kernels it times needs
only a CPU. So a first run of the graph plans every template launch the timing run will make (the
shortlisted configurations of each tunable node, on the inputs it will see) and sends each distinct
compile to the process's compile pool (kernels/compile_pool.py). The timing run then waits only for
the kernels of the node at hand, while the workers compile ahead of it on every core.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Any

import torch

from ..ir.graph import Node
from ..kernels import bind_tactic, candidates
from ..kernels.template_choice import TEMPLATES, shortlist
from .tuner import TimingCache, TuneReport, _bound_args, _cached_choice, choice_hashes, node_signature

log = logging.getLogger(__name__)


def plan_compiles(device: torch.device, interp: Any, feeds: dict, tunable: dict[str, Node], cache: TimingCache,
                  keep: int, sms: int, report: TuneReport) -> dict[str, list[Future]]:
    """Run the graph once and send the compile of every template launch the timing run will make
    to the compile pool: node name -> the Futures of its kernels. Each tunable node runs with a
    vendor tactic (or its cached winner), so later nodes see the layouts they will be timed on."""
    from ..kernels.compile_pool import shared_pool
    from ..kernels.triton_templates import launch_of

    pool = shared_pool(device)
    if pool is None:
        return {}
    futures: dict[str, list[Future]] = {}

    def on_step(step: Any, args: list) -> None:
        node = step.node
        if step.kernel is not None or node.name not in tunable:
            return
        cands = [c.name for c in candidates(node, device)]
        names = shortlist(cands, args, node.attrs, keep, sms)
        cached = _cached_choice(cache, cache.key(device, node_signature(node, args)), choice_hashes(node.op, names))
        planned = [cached] if cached is not None else names
        for name in planned:
            if name not in TEMPLATES:
                continue
            b = _bound_args(node, name, device, interp, args)
            launch = launch_of(name, b[1], b[0].attrs) if b is not None else None
            if launch is not None:
                fut = pool.submit(launch.spec())
                if fut not in futures.setdefault(node.name, []):
                    futures[node.name].append(fut)
        # run this step with a vendor tactic (or the cached winner): the layouts later nodes will see
        node.meta["tactic"] = cached or next((n for n in cands if n not in TEMPLATES), "reference")
        bound = bind_tactic(node, device, interp.consts)  # its prepared weights where the run reads them
        if bound is not None:
            interp.bound[node.name] = bound
        else:
            interp.bound.pop(node.name, None)

    interp.on_step = on_step
    try:
        interp.run(feeds)
    except Exception as e:  # the timing run meets (and reports) the same failure; compiles stay in-process
        log.warning("planning the kernel compiles failed (%s: %s); compiling while timing instead", type(e).__name__, e)
    finally:
        interp.on_step = None
        for n in tunable.values():
            n.meta.pop("tactic", None)
            interp.bound.pop(n.name, None)
    report.compiled = len({id(f) for fs in futures.values() for f in fs})
    return futures
