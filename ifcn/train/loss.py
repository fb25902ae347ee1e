"""InstanceFCN's training loss on its maps: objectness logistic loss + per-pixel logistic loss on
assembled masks, unweighted (as the paper); the mask term covers positive windows only.

One implementation serves training and this name: the model registry's (ifcn/models.py).
"""
from __future__ import annotations

from ..models import instancefcn_map_loss as instance_fcn_loss

__all__ = ["instance_fcn_loss"]
