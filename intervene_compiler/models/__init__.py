"""Model families with their own input handling: ``LanguageModel`` for ``transformers`` causal LMs."""

from .language import Generator, LanguageModel, WrapperModule

__all__ = ["Generator", "LanguageModel", "WrapperModule"]
