"""Placeholder until the decode graphs land (step 7)."""
from __future__ import annotations

import torch


class DecodeGraphs:
    @staticmethod
    def supported(device: torch.device) -> bool:
        return False
