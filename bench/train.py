"""One training step (forward, loss, backward, AdamW) of a whole model:
attnkit against the same model in PyTorch.

    python bench/train.py --threads 1
    python bench/train.py --threads 2 --rounds 5
    python bench/train.py --groups seq2seq

Groups:
  seq2seq  an encoder-decoder: token embeddings (vocabulary 1000) into
           TransformerEncoder / TransformerDecoder of 2 + 2 post-norm layers,
           d_model 256, 4 heads, d_ff 1024, ReLU, dropout 0.1, batch_first,
           causal decoder; a Linear to the vocabulary and cross-entropy over
           every target token. Batch 32, L = S = 64.
  minilm   all-MiniLM-L6-v2's architecture (BERT, 6 layers, 384 wide, 12
           heads, intermediate 1536, dropout 0.1) with every layer trainable,
           a Linear(384, 2) on the [CLS] state and cross-entropy: a
           fine-tuning step. Batch 16 x 64 tokens. Random weights of the
           same shapes (the step's cost does not depend on their values);
           PyTorch's side is transformers.BertModel (eager attention, as its
           default on CPU training is; no pooler).
Both sides: AdamW(lr 1e-4, weight decay 0.01) over every parameter, the
gradients zeroed before each step, float32.

Each measurement runs in a fresh process of its own, NumPy imported first as
users do, the contenders taking turns round after round and held to the same
threads (each library's setting and OMP_NUM_THREADS). The table gives the
median over rounds of each process's median step time, the median of the
per-round ratios attnkit / torch (target: at most 0.8 for seq2seq, 1.0 for
minilm), and each process's peak memory growth over its steps (the peak
resident set after the timed steps minus the resident set before the first
step, with model, optimiser state and batch already made).
"""
import argparse
import statistics
import sys

from worker import run_worker

GROUPS = ["seq2seq", "minilm"]
VOCAB, D_MODEL, HEADS, D_FF, LAYERS, BATCH, LENGTH = 1000, 256, 4, 1024, 2, 32, 64
MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=3072 // 2, max_position_embeddings=512, hidden_act="gelu",
              hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, layer_norm_eps=1e-12)
MINILM_BATCH, MINILM_LENGTH = 16, 64


def batch(group):
    import numpy as np
    rng = np.random.default_rng(0)
    if group == "seq2seq":
        src = rng.integers(0, VOCAB, (BATCH, LENGTH))
        tgt_in = rng.integers(0, VOCAB, (BATCH, LENGTH))
        target = rng.integers(0, VOCAB, (BATCH, LENGTH))
        return src, tgt_in, target
    ids = rng.integers(1000, MINILM["vocab_size"], (MINILM_BATCH, MINILM_LENGTH))
    mask = np.ones_like(ids)
    mask[::3, MINILM_LENGTH * 3 // 4:] = 0                        # some padded sentences
    return ids, mask, rng.integers(0, 2, MINILM_BATCH)


def attnkit_step(group, threads):
    import numpy as np
    import attnkit
    from attnkit import nn, optim
    if threads:
        attnkit.set_num_threads(threads)
    rng = np.random.default_rng(0)
    criterion = nn.CrossEntropyLoss()
    if group == "seq2seq":
        class Seq2Seq(nn.Module):
            def __init__(self):
                super().__init__()
                self.src_embed = nn.Embedding(VOCAB, D_MODEL, rng=rng)
                self.tgt_embed = nn.Embedding(VOCAB, D_MODEL, rng=rng)
                self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(
                    D_MODEL, HEADS, D_FF, batch_first=True, rng=rng), LAYERS)
                self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(
                    D_MODEL, HEADS, D_FF, batch_first=True, rng=rng), LAYERS)
                self.head = nn.Linear(D_MODEL, VOCAB, rng=rng)

            def forward(self, src, tgt_in):
                memory = self.encoder(self.src_embed(src))
                return self.head(self.decoder(self.tgt_embed(tgt_in), memory, tgt_is_causal=True))

            def backward(self, grad):
                d_tgt, d_memory = self.decoder.backward(self.head.backward(grad))
                self.tgt_embed.backward(d_tgt)
                self.src_embed.backward(self.encoder.backward(d_memory))

        model = Seq2Seq()
        src, tgt_in, target = batch(group)
        inputs = (src, tgt_in)
        flat_target = target.reshape(-1)

        def logits_to_loss(logits):
            loss = criterion(logits.reshape(-1, VOCAB), flat_target)
            return loss, criterion.backward().reshape(logits.shape)
    else:
        from attnkit.models import BertConfig, BertModel

        class Classifier(nn.Module):
            def __init__(self):
                super().__init__()
                self.bert = BertModel(BertConfig(**MINILM), rng=rng)
                self.head = nn.Linear(MINILM["hidden_size"], 2, rng=rng)

            def forward(self, ids, mask):
                self._hidden = self.bert(ids, mask)
                return self.head(self._hidden[:, 0])

            def backward(self, grad):
                d_hidden = np.zeros_like(self._hidden)
                d_hidden[:, 0] = self.head.backward(grad)
                self.bert.backward(d_hidden)

        model = Classifier()
        ids, mask, labels = batch(group)
        inputs = (ids, mask)

        def logits_to_loss(logits):
            return criterion(logits, labels), criterion.backward()
    model.train()
    optimizer = optim.AdamW(model, lr=1e-4, weight_decay=0.01)

    def step():
        optimizer.zero_grad()
        loss, grad = logits_to_loss(model(*inputs))
        model.backward(grad)
        optimizer.step()
        return loss
    return step


def torch_step(group, threads):
    import torch
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    criterion = torch.nn.CrossEntropyLoss()
    if group == "seq2seq":
        class Seq2Seq(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.src_embed = torch.nn.Embedding(VOCAB, D_MODEL)
                self.tgt_embed = torch.nn.Embedding(VOCAB, D_MODEL)
                self.encoder = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(
                    D_MODEL, HEADS, D_FF, batch_first=True), LAYERS, enable_nested_tensor=False)
                self.decoder = torch.nn.TransformerDecoder(torch.nn.TransformerDecoderLayer(
                    D_MODEL, HEADS, D_FF, batch_first=True), LAYERS)
                self.head = torch.nn.Linear(D_MODEL, VOCAB)
                self.register_buffer("causal", torch.nn.Transformer.generate_square_subsequent_mask(LENGTH))

            def forward(self, src, tgt_in):
                memory = self.encoder(self.src_embed(src))
                return self.head(self.decoder(self.tgt_embed(tgt_in), memory, tgt_mask=self.causal,
                                              tgt_is_causal=True))

        model = Seq2Seq()
        src, tgt_in, target = (torch.from_numpy(a) for a in batch(group))

        def loss_of():
            return criterion(model(src, tgt_in).reshape(-1, VOCAB), target.reshape(-1))
    else:
        import transformers

        class Classifier(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.bert = transformers.BertModel(transformers.BertConfig(
                    **MINILM, attn_implementation="eager"), add_pooling_layer=False)
                self.head = torch.nn.Linear(MINILM["hidden_size"], 2)

            def forward(self, ids, mask):
                return self.head(self.bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0])

        model = Classifier()
        ids, mask, labels = (torch.from_numpy(a) for a in batch(group))

        def loss_of():
            return criterion(model(ids, mask), labels)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    def step():
        optimizer.zero_grad()
        loss = loss_of()
        loss.backward()
        optimizer.step()
        return loss.detach().item()
    return step


def make_step(contender, group, threads=None):
    """A callable of no arguments: one training step of `group` by `contender`."""
    return (attnkit_step if contender == "attnkit" else torch_step)(group, threads)


WORKER = r"""
import json, os, resource, statistics, sys, time
import numpy as np                        # first, as users do
sys.path.insert(0, sys.argv[1])
from train import make_step
contender, group, threads = sys.argv[2], sys.argv[3], int(sys.argv[4])
step = make_step(contender, group, threads)

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

before = resident()
step()                                    # the first step makes the gradients and AdamW's moments
times = []
cpu = []
for _ in range(5):
    t, c = time.perf_counter(), time.process_time()
    step()
    times.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps([statistics.median(times), (peak - before) / 2**20,
                  sum(cpu) / sum(times) / threads]))
"""


def main(argv=None):
    import os
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="processes per contender and group")
    parser.add_argument("--groups", nargs="*", default=GROUPS, choices=GROUPS)
    args = parser.parse_args(argv)
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError:
        sys.exit("bench/train.py compares with PyTorch and transformers, which are not installed")
    import numpy
    import attnkit
    here = os.path.dirname(os.path.abspath(__file__))
    print(f"attnkit {attnkit.__version__} ({attnkit.simd_path()}), numpy {numpy.__version__}, "
          f"torch {torch.__version__}; {args.threads} thread(s); median of {args.rounds} rounds")
    print(f"{'training step':<14}{'attnkit':>11}{'torch':>11}{'attnkit/torch':>15}"
          f"{'peak MB attnkit':>17}{'torch':>8}{'cpu/wall':>10}")
    for group in args.groups:
        results = {"attnkit": [], "torch": []}
        ratios = []
        for r in range(args.rounds):
            order = ("attnkit", "torch") if r % 2 == 0 else ("torch", "attnkit")
            this = {c: run_worker(WORKER, args.threads, here, c, group, args.threads) for c in order}
            for c in order:
                results[c].append(this[c])
            ratios.append(this["attnkit"][0] / this["torch"][0])

        def median(c, i):
            return statistics.median(x[i] for x in results[c])
        print(f"{group:<14}{median('attnkit', 0) * 1e3:>9.1f}ms{median('torch', 0) * 1e3:>9.1f}ms"
              f"{statistics.median(ratios):>14.2f}{median('attnkit', 1):>17.0f}{median('torch', 1):>8.0f}"
              f"{max(median('attnkit', 2), median('torch', 2)):>10.2f}", flush=True)


if __name__ == "__main__":
    main()
