"""Which Triton template configurations a layer's shape gets compiled and timed.

Every tile configuration is correct for every shape, but a build that compiles and times all of
them for every distinct layer spends a minute compiling (ResNet-50: 54 template layers, 135
distinct compiles). Most cannot win: a 128-row tile on a 49-row problem computes 62% padding; a
grid of 4 tiles leaves 128 of 132 SMs idle. :func:`shortlist` ranks the configurations with a
model of that waste (:func:`modeled_cost`) and keeps the few closest to the best; the timing
decides among those. The builder level sets how many (``KEEP_BY_LEVEL``); level 4 and up keep all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TileConfig:
    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    group_m: int = 8

    def __str__(self) -> str:
        return f"{self.bm}x{self.bn}x{self.bk},w{self.warps},s{self.stages}"

    @classmethod
    def parse(cls, text: str) -> "TileConfig":
        """The inverse of str(): '128x64x32,w4,s4' (a choice's name carries its tile this way)."""
        try:
            tile, warps, stages = text.split(",")
            bm, bn, bk = (int(v) for v in tile.split("x"))
            if not (warps.startswith("w") and stages.startswith("s")):
                raise ValueError
            cfg = cls(bm, bn, bk, int(warps[1:]), int(stages[1:]))
        except ValueError:
            raise ValueError(f"'{text}' is not a tile configuration (BMxBNxBK,wWARPS,sSTAGES)") from None
        if min(bm, bn, bk) < 16 or any(v & (v - 1) for v in (bm, bn, bk)) or not (1 <= cfg.warps <= 32):
            raise ValueError(f"'{text}': tile sides must be powers of two of at least 16, warps 1..32")
        return cfg


# Hopper fp16/bf16: large tiles for big GEMMs, narrower ones for N = 64..128 and smaller M
GEMM_CONFIGS = [TileConfig(128, 256, 64, 8, 3), TileConfig(128, 128, 64, 8, 4), TileConfig(128, 128, 32, 4, 4),
                TileConfig(64, 128, 64, 4, 4), TileConfig(128, 64, 64, 4, 4), TileConfig(64, 64, 64, 4, 4)]
# convs: Cout is 64..512 while M = N*OH*OW is large; BK=32 suits Cin=3 stems (K=147) and Cin=32
CONV_CONFIGS = [TileConfig(128, 128, 64, 8, 3), TileConfig(128, 64, 64, 4, 4), TileConfig(256, 64, 64, 8, 3),
                TileConfig(128, 256, 64, 8, 3), TileConfig(128, 64, 32, 4, 4), TileConfig(64, 128, 64, 4, 4)]

# tactic name -> (kind: gemm, conv, qgemm or qconv; its tile configuration): the template modules register them
TEMPLATES: dict[str, tuple[str, TileConfig]] = {}
# builder level -> template configurations timed per layer (0: all)
# level 2 (the default) times every configuration: with compiles in parallel workers a ResNet-50 b256
# fp16 build took 11 s instead of 6.3 s on the H200, and ran 6.58 ms instead of 6.99 ms (3 kept)
KEEP_BY_LEVEL = {0: 1, 1: 3, 2: 0, 3: 0, 4: 0, 5: 0}
SHARED_MEMORY = 227 * 1024  # bytes of shared memory a CTA may use per SM on sm_90
FULL_SM_WARPS = 8  # warps that keep one SM's tensor cores busy


def problem_size(kind: str, args: list, attrs: dict) -> "tuple[int, int, int] | None":
    """(M, N, K) of the GEMM a template computes for these inputs (a conv's implicit GEMM:
    M = N*OH*OW, N = Cout, K = KH*KW*Cin), or None if it cannot tell."""
    try:
        if kind.endswith("gemm"):  # gemm, qgemm
            a, b = args[0], args[1]
            k, n = (b.shape[1], b.shape[0]) if attrs.get("trans_b", 0) else (b.shape[0], b.shape[1])
            return a.numel() // max(1, int(a.shape[-1])), int(n), int(k)
        from .triton_templates import conv_geometry

        x, w = args[0], args[1]
        geom = conv_geometry(attrs, tuple(w.shape), tuple(x.shape[2:]))
        if geom is None:
            return None
        oh, ow = geom[3]
        return int(x.shape[0]) * oh * ow, int(w.shape[0]), int(w.shape[1] * w.shape[2] * w.shape[3])
    except (AttributeError, IndexError, TypeError, ValueError):
        return None


def modeled_cost(cfg: TileConfig, m: int, n: int, k: int, sms: int) -> float:
    """Relative time of ``cfg`` on an (M, N, K) problem: the tile work (padding included) the
    busiest SM does, slowed when too few warps run on an SM to keep its tensor cores busy.

    It counts what a configuration wastes on a shape (a 128-row tile on 49 rows, K padded to BK,
    a grid of 4 tiles on 132 SMs), not how fast its kernel is: it ranks configurations so that
    those that cannot win are neither compiled nor timed. Timing decides among the rest.
    """
    tiles = -(-m // cfg.bm) * -(-n // cfg.bn)
    per_sm = -(-tiles // sms)  # tiles the busiest SM works through
    smem = (cfg.bm + cfg.bn) * cfg.bk * 2 * cfg.stages
    fit = max(1, min(SHARED_MEMORY // max(smem, 1), 64 // cfg.warps))  # CTAs one SM holds at once
    busy = min(1.0, min(per_sm, fit) * cfg.warps / FULL_SM_WARPS)
    return per_sm * cfg.bm * cfg.bn * (-(-k // cfg.bk) * cfg.bk) / busy


def shortlist(names: list[str], args: list, attrs: dict, keep: int, sms: int = 132,
              tolerance: float = 0.25) -> list[str]:
    """The tactics among ``names`` worth compiling and timing on these inputs. Template tactics: the
    cheapest by the model, then those within ``tolerance`` of it in the configuration lists' order
    (the lists put the usual winners first), at most ``keep`` and at least two (the next cheapest
    if none is near). Other tactics pass unchanged; ``keep`` <= 0 keeps every configuration."""
    templates = [t for t in names if t in TEMPLATES]
    if keep <= 0 or len(templates) <= keep:
        return list(names)
    size = problem_size(TEMPLATES[templates[0]][0], args, attrs)
    if size is None or min(size) <= 0:
        return list(names)
    cost: dict[str, Any] = {t: modeled_cost(TEMPLATES[t][1], *size, sms) for t in templates}
    best = min(cost.values())
    cheapest = min(templates, key=lambda t: cost[t])  # the first of the cheapest, in list order
    near = [cheapest] + [t for t in templates if t != cheapest and cost[t] <= best * (1 + tolerance)]
    ranked = near + sorted((t for t in templates if t not in near), key=lambda t: cost[t])
    chosen = set(ranked[:max(keep if len(near) >= keep else len(near), min(2, keep))])
    return [t for t in names if t not in TEMPLATES or t in chosen]
