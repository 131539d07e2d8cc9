"""Pipelines composing the ColorFlow networks."""
from .colorflow_pixart import ColorFlowPixArtPipeline
from .colorflow_sd import ColorFlowSDPipeline
from .condition import ICPResult, ICPSampler
from .guided_sr import GuidedSuperResolver
from .t5_prompt import PromptEmbeddings, T5PromptEncoder

__all__ = [
    "ColorFlowPixArtPipeline", "ColorFlowSDPipeline", "GuidedSuperResolver", "ICPResult", "ICPSampler", "PromptEmbeddings", "T5PromptEncoder",
]
