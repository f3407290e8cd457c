"""Evaluation helpers on real models and text that ship inside packages (no hub needed).

    from tensorslim.eval import load_minilm, pydoc_sentences, embed, embedding_cosine
"""
from .digits_basic_resnet import DigitsResNet, digits_images
from .embeddings import embed, embedding_cosine, load_minilm, pydoc_sentences
from .perplexity import perplexity

__all__ = ["pydoc_sentences", "load_minilm", "embed", "embedding_cosine", "perplexity", "DigitsResNet",
           "digits_images"]
