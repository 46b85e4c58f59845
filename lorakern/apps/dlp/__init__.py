"""DLP-LoRA: a light plugin that picks and fuses task adapters per prompt (see :mod:`lorakern.apps.dlp.router`)."""
from .router import DEFAULT_TOP_P, DLPRouter, FixedMixture, prompt_features, top_p_select
from .train import attach_router, prompt_batches, train_router

__all__ = ["DEFAULT_TOP_P", "DLPRouter", "FixedMixture", "attach_router", "prompt_batches", "prompt_features",
           "top_p_select", "train_router"]
