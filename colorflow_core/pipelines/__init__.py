"""Pipelines composing the ColorFlow networks."""
from .colorflow_sd import ColorFlowSDPipeline, ICPResult
from .guided_sr import GuidedSuperResolver

__all__ = ["ColorFlowSDPipeline", "GuidedSuperResolver", "ICPResult"]
