"""Disentangling polysemantic channels in CNNs (Hesse et al., CVPRW 2025): the shared package."""
from .errors import UserError

__all__ = ["UserError"]
