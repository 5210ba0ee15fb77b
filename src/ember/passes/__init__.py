"""Graph rewrites: each pass a function ``(graph, ctx) -> changed``; a fixed pipeline per level.

See pipeline.py for the passes of each optimization level, rewrite.py for the pattern mechanism
every pass is written in.
"""
from .fusion import count_kernels, group_fusions
from .pipeline import LEVELS, passes_for_level, run_pipeline
from .rewrite import Editor, Match, P, PassContext, Rule, apply_rules

__all__ = ["Editor", "LEVELS", "Match", "P", "PassContext", "Rule", "apply_rules", "count_kernels",
           "group_fusions", "passes_for_level", "run_pipeline"]
