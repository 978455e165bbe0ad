"""One ItrSA / AKOrN step (the residual update composed with attention and normalisation), linearised."""

from .ref import AKOrNLinearization, AKOrNParams, ItrSALinearization, ItrSAParams, StepLinearization

__all__ = ["AKOrNLinearization", "AKOrNParams", "ItrSALinearization", "ItrSAParams", "StepLinearization"]
