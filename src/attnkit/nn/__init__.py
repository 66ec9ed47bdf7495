"""attnkit.nn: layers with PyTorch's names, parameters as NumPy arrays.

    >>> import numpy as np
    >>> from attnkit import nn
    >>> mha = nn.MultiHeadAttention(embed_dim=8, num_heads=2, batch_first=True,
    ...                             rng=np.random.default_rng(0))
    >>> x = np.random.default_rng(1).standard_normal((3, 5, 8), dtype=np.float32)
    >>> out, weights = mha(x, x, x)
    >>> out.shape, weights.shape
    ((3, 5, 8), (3, 5, 5))
    >>> mha.num_parameters() == 4 * 8 * 8 + 4 * 8
    True
"""
from . import init
from .attention import Attention, KVCache, MultiHeadAttention, attention_scores
from .layers import (
    GELU,
    BatchNorm1d,
    Dropout,
    Embedding,
    Identity,
    LayerNorm,
    Linear,
    ReLU,
    RMSNorm,
    Sigmoid,
    SiLU,
    Tanh,
    get_activation,
)
from .loss import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from .module import Module, ModuleList, Sequential
from .positional import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    alibi_bias,
    alibi_slopes,
    sinusoidal_positional_encoding,
)
from .transformer import (
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)

__all__ = [
    "init", "Module", "ModuleList", "Sequential",
    "Linear", "LayerNorm", "RMSNorm", "BatchNorm1d", "Dropout", "Embedding", "Identity",
    "ReLU", "GELU", "SiLU", "Sigmoid", "Tanh", "get_activation",
    "MultiHeadAttention", "KVCache", "Attention", "attention_scores",
    "sinusoidal_positional_encoding", "SinusoidalPositionalEncoding", "LearnedPositionalEmbedding",
    "RotaryEmbedding", "alibi_slopes", "alibi_bias",
    "TransformerEncoderLayer", "TransformerDecoderLayer", "TransformerEncoder", "TransformerDecoder",
    "CrossEntropyLoss", "BCEWithLogitsLoss", "MSELoss",
]
