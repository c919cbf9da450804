"""fxpatch: NNsight's batched, cross-prompt interventions on an exported FX graph.

Example::

    from fxpatch import LanguageModel, TINY_GPT2
    model = LanguageModel(TINY_GPT2)
    with model.trace() as tracer:
        barrier = tracer.barrier(2)
        with tracer.invoke("Madison square garden is located in the city of New"):
            embeddings = model.transformer.wte.output
            barrier()
        with tracer.invoke("_ _ _ _ _ _ _ _ _ _"):
            barrier()
            model.transformer.wte.output = embeddings
            logits = model.lm_head.output.save()
"""

from __future__ import annotations

import os

from . import errors, patching
from .model import LanguageModel, TransformersModel
from .runner import format_inserted
from .saving import save

__version__ = "0.1.0"

TINY_GPT2: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny-gpt2")
"""Path of the embedded tiny GPT-2 (Hugging Face format): ``LanguageModel(fxpatch.TINY_GPT2)``."""

__all__ = ["TINY_GPT2", "LanguageModel", "TransformersModel", "errors", "format_inserted", "patching", "save",
           "__version__"]
