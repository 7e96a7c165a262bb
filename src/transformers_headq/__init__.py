"""transformers-headq: 2-bit KV-cache quantization with a score-space side code (HeadQ).

Quick use::

    from transformers_headq import HeadQCache
    cache = HeadQCache.from_pretrained("path/or/org-name", model=model)
    model.generate(**inputs, past_key_values=cache)
"""

from .attention import ATTENTION_NAME, enable_headq_attention, headq_attention_forward, register_headq_attention
from .basis import LayerBasis, QueryBasis
from .cache import HeadQCache
from .config import BitsPerElement, HeadQConfig, bits_per_element
from .errors import BasisFormatError, BasisMismatchError, CacheInputError, HeadQError, UnsupportedModelError
from .factory import HeadQCacheFactory
from .layer import HeadQLayer

__version__ = "0.1.0"

register_headq_attention()

__all__ = [
    "ATTENTION_NAME",
    "BasisFormatError",
    "BasisMismatchError",
    "BitsPerElement",
    "CacheInputError",
    "HeadQCache",
    "HeadQCacheFactory",
    "HeadQConfig",
    "HeadQError",
    "HeadQLayer",
    "LayerBasis",
    "QueryBasis",
    "UnsupportedModelError",
    "bits_per_element",
    "enable_headq_attention",
    "headq_attention_forward",
    "register_headq_attention",
]
