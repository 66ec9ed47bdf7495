"""Teacher forcing, exposure bias and scheduled sampling, on a transformer
that learns to reverse digit strings.

THE TASK. The input is a random string of 5 to 12 digits, "3 1 4 1 5"; the
output is the same digits reversed, then an end marker: "5 1 4 1 3 <eos>".
The model is a small encoder-decoder transformer built from attnkit.nn and
trained from scratch, in NumPy, in about a minute.

HOW A DECODER IS TRAINED: TEACHER FORCING. The decoder writes the output one
token at a time, each token chosen from the tokens before it. In training we
know the whole right answer, so we do not let the model write anything: its
input is the right answer shifted one place to the right,

    decoder input   <bos>  5  1  4  1  3
    target             5   1  4  1  3  <eos>

and at every position it learns to predict the next right token from the
right tokens before it. A causal mask stops position t from peeking at t + 1
and later, so all positions train at once, in one pass. This is teacher
forcing: the teacher always hands the model a correct history.

EXPOSURE BIAS. At test time nobody hands the model the right history: it
reads its own previous outputs (greedy decoding: feed back the most likely
token, step after step). The model has only ever seen correct histories; the
first time it makes a mistake it is in a situation it never met in training,
and the mistake can snowball. That mismatch between training (gold history)
and use (own history) is called exposure bias. This script measures it in
two ways: accuracy by output position under both regimes, and a stress test
that forces one wrong token at position j during greedy decoding and counts
how often the model still gets everything after j right.

SCHEDULED SAMPLING (Bengio et al., 2015). Train on histories that contain
the model's own predictions, a little at first and more and more later. At
training step i each decoder input token is the gold one with probability

    eps_i = k / (k + exp(i / k))          (the "inverse sigmoid" decay)

and the model's own prediction otherwise. eps starts near 1 (pure teacher
forcing, while the model's predictions are still rubbish) and decays towards
0. An RNN makes its predictions as it goes; a transformer decodes every
position in one parallel pass, so it needs two passes (Mihaylova and Martins,
2019): pass 1 runs the decoder on the gold input, in eval mode (nothing kept
for backward) to get its prediction at every position; then each input
position is replaced by the prediction for it with probability 1 - eps_i;
pass 2 runs, and trains, on that mixed input. The targets stay the gold ones.

THE MODEL AND THE RECIPE. Embeddings plus learned position embeddings, a
2-layer encoder and a 2-layer decoder (d_model 64, 4 heads, feed-forward 128,
pre-norm, no dropout: every batch is fresh data), a Linear head over the 13
tokens. AdamW (lr 3e-3, betas 0.9/0.98), linear warm-up over 60 steps then
a cosine decay, gradients clipped to norm 1, 600 steps of 128 strings. The
loss is cross-entropy with the padding ignored. attnkit has no autograd:
Seq2Seq.backward calls each child's backward in the reverse order of
forward, and each adds its parameters' gradients into model.grads(), which
the optimiser reads. Decoding is greedy with a KVCache per decoder layer, so
each step runs the decoder on the new token only; the script checks that
this decodes exactly what recomputing the whole prefix every step decodes.

WHAT YOU SHOULD SEE (seed 0; the figures do not depend on the thread count,
only the times do). Both trainings pass 99% exact match on 1000 held-out
strings after 350-400 steps (about half a minute on 2 cores) and end at
100%. The first table is the exposure-bias picture, clearest mid-training:
after 100 steps the token accuracy with the gold history is above 90% at
every position, while with the model's own history it falls up to 8 points
below that, and a string that goes wrong has about 1.2 wrong tokens when
teacher-forced but 2.4 when the model reads its own output: one mistake
drags more after it. (Exact match cannot show this: a string with no mistake
feeds back exactly the gold history, so it is the same either way.) The
second table breaks the finished models on purpose: one wrong digit at
position j. The teacher-forced model still gets the rest right in about 65%
of the strings (13% when the very first digit is wrong), the scheduled-
sampling one in about 76% (25%). The example printed before the tables shows
the typical failure: the model reads its own output to keep its place, takes
the wrong digit as a sign that it has not yet written the one it was denied,
writes that one a step late, and then falls back in step. Scheduled sampling
helps, but less than you might hope, and the run shows why: the model is
soon so accurate that its "own predictions" are nearly always the gold
tokens, so only about 0.2% of the inputs scheduled sampling fed it were
actually wrong. It learns from the mistakes it makes, and it makes few.
(With another seed the gap is smaller, 67% against 70%: a small effect, not
a law.)

RUN IT:

    python examples/teacher_forcing.py             # both trainings, then the tables (~2 min)
    python examples/teacher_forcing.py --quick     # ~10 s: a short run that checks the mechanism
    python examples/teacher_forcing.py --threads 1 --seed 3

The progress lines show the step, the batch's loss and token accuracy, and
the time since the training started (and the training steps' own share,
without the held-out evaluations). main(argv) returns a dict of the figures,
and under "models" the two trained models, to look inside.
"""
import argparse
import contextlib
import math
import sys
import time

import numpy as np

import attnkit
from attnkit import nn, optim
from attnkit.progress import progress_bar

# the vocabulary: ten digits, then three special tokens
PAD, BOS, EOS = 10, 11, 12
VOCAB = 13
MIN_LEN, MAX_LEN = 5, 12
NAMES = [str(d) for d in range(10)] + ["<pad>", "<bos>", "<eos>"]


# ---------------------------------------------------------------------------
# Data

def make_sequences(rng, n, min_len=MIN_LEN, max_len=MAX_LEN):
    """n random digit strings, as an (n, max_len) array padded with PAD."""
    lengths = rng.integers(min_len, max_len + 1, n)
    digits = rng.integers(0, 10, (n, max_len))
    return np.where(np.arange(max_len) < lengths[:, None], digits, PAD)


def batch_arrays(src):
    """(src, tgt_in, tgt_out) for padded source strings, trimmed to the
    longest string: tgt_out is the reversed string then EOS, tgt_in is
    tgt_out shifted right behind BOS (teacher forcing's input)."""
    lengths = (src != PAD).sum(axis=1)
    width = int(lengths.max())
    src = src[:, :width]
    pos = np.arange(width)
    # reversed: position p holds the digit at position length - 1 - p
    rev = np.take_along_axis(src, np.clip(lengths[:, None] - 1 - pos, 0, None), axis=1)
    rev = np.where(pos < lengths[:, None], rev, PAD)
    tgt_out = np.concatenate([rev, np.full((len(src), 1), PAD)], axis=1)     # (n, width + 1)
    tgt_out[np.arange(len(src)), lengths] = EOS
    tgt_in = np.concatenate([np.full((len(src), 1), BOS), tgt_out[:, :-1]], axis=1)
    tgt_in[tgt_in == EOS] = PAD                 # EOS is only ever a target
    return src, tgt_in, tgt_out


class TrainingData:
    """An endless supply of fresh random strings, none of them in `held_out`."""

    def __init__(self, rng, held_out):
        self.rng = rng
        self.held_out = {tuple(row) for row in held_out}

    def batch(self, n):
        src = make_sequences(self.rng, n)
        keep = np.array([tuple(row) not in self.held_out for row in src])
        return batch_arrays(src[keep])


# ---------------------------------------------------------------------------
# The model

class Seq2Seq(nn.Module):
    """Token embeddings + positions -> TransformerEncoder (source),
    TransformerDecoder (target, causal, attending to the encoder's output)
    -> Linear head over the vocabulary.

    forward(src, tgt_in) -> logits (N, L, VOCAB); backward(grad_logits)
    sends the gradient back through every child in reverse order, so that
    each child's parameters get their gradients in grads()."""

    def __init__(self, d_model=64, nhead=4, num_layers=2, dim_feedforward=128, positions="learned",
                 rng=None):
        super().__init__()
        rng = np.random.default_rng(0) if rng is None else rng
        self.src_embed = nn.Embedding(VOCAB, d_model, padding_idx=PAD, rng=rng)
        self.tgt_embed = nn.Embedding(VOCAB, d_model, padding_idx=PAD, rng=rng)
        # two position modules, not one shared: each keeps its own forward's
        # shape for its backward (a learned table shared by both would also
        # need its two gradients added)
        if positions not in ("learned", "sinusoidal"):
            raise ValueError(f"positions must be 'learned' or 'sinusoidal', got {positions!r}")
        if positions == "sinusoidal":
            self.src_pos = nn.SinusoidalPositionalEncoding(d_model, max_length=MAX_LEN + 1)
            self.tgt_pos = nn.SinusoidalPositionalEncoding(d_model, max_length=MAX_LEN + 1)
        else:
            self.src_pos = nn.LearnedPositionalEmbedding(MAX_LEN + 1, d_model, rng=rng)
            self.tgt_pos = nn.LearnedPositionalEmbedding(MAX_LEN + 1, d_model, rng=rng)
        # pre-norm layers (norm_first) train without fuss from scratch; they
        # want a final LayerNorm on each stack. No dropout: the data is endless.
        layer = dict(d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward, dropout=0.0,
                     batch_first=True, norm_first=True, rng=rng)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(**layer), num_layers,
                                             norm=nn.LayerNorm(d_model))
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer), num_layers,
                                             norm=nn.LayerNorm(d_model))
        self.head = nn.Linear(d_model, VOCAB, rng=rng)

    def encode(self, src):
        """The encoder's output ("memory"), (N, S, d_model). Padding keys are
        hidden (True = pad, PyTorch's MultiheadAttention convention)."""
        x = self.src_pos(self.src_embed(src))
        return self.encoder(x, src_key_padding_mask=src == PAD)

    def decode(self, memory, src_pad, tgt_in, kv_caches=None, offset=0):
        """Logits (N, L, VOCAB) for decoder input tgt_in (N, L). Causal: in
        attnkit tgt_is_causal=True is enough (PyTorch also wants the mask,
        tgt_mask = np.triu(np.ones((L, L), bool), 1), True = hidden). With
        kv_caches (eval mode only), tgt_in holds only the new tokens, the
        first of them at position `offset`."""
        x = self.tgt_pos(self.tgt_embed(tgt_in), offset=offset)
        h = self.decoder(x, memory, memory_key_padding_mask=src_pad,
                         tgt_is_causal=kv_caches is None, kv_caches=kv_caches)
        self._save(True)
        return self.head(h)

    def forward(self, src, tgt_in):
        return self.decode(self.encode(src), src == PAD, tgt_in)

    def _backward(self, grad_logits):
        g = self.head.backward(grad_logits)
        d_tgt, d_memory = self.decoder.backward(g)
        self.tgt_embed.backward(self.tgt_pos.backward(d_tgt))    # Embedding: returns None
        d_src = self.encoder.backward(d_memory)
        self.src_embed.backward(self.src_pos.backward(d_src))
        return None

    def decoder_side(self):
        return (self.tgt_embed, self.tgt_pos, self.decoder, self.head)


@contextlib.contextmanager
def eval_mode(*modules):
    """Run these modules in eval mode (no saving for backward), then back."""
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m in modules:
            m.train()


# ---------------------------------------------------------------------------
# Decoding

def greedy_decode(model, src, force=None, use_cache=True):
    """Greedy decoding: feed back the most likely token, step by step, until
    every row has written EOS or MAX_LEN + 1 tokens. Returns (N, steps).

    use_cache: each step runs the decoder on the new token only, with a
    KVCache per layer holding the keys and values of the earlier steps
    (use_cache=False recomputes the whole prefix every step, for checking).
    force: (positions, tokens), two (N,) int arrays: at step positions[i],
    row i is fed tokens[i] instead of its own prediction (position -1:
    never), to see what the model makes of a history with a mistake in it."""
    model.eval()
    src = np.asarray(src)
    src_pad = src == PAD
    memory = model.encode(src)
    n = len(src)
    steps = int((~src_pad).sum(axis=1).max()) + 1
    caches = [nn.KVCache() for _ in range(model.decoder.num_layers)] if use_cache else None
    history = np.full((n, 1), BOS)
    out = np.empty((n, steps), np.int64)
    done = np.zeros(n, bool)
    for t in range(steps):
        if use_cache:
            logits = model.decode(memory, src_pad, history[:, -1:], kv_caches=caches, offset=t)
        else:
            logits = model.decode(memory, src_pad, history)
        token = logits[:, -1].argmax(axis=-1)
        if force is not None:
            token = np.where(force[0] == t, force[1], token)
        out[:, t] = token
        done |= token == EOS
        if done.all():
            return out[:, :t + 1]
        history = np.concatenate([history, token[:, None]], axis=1)
    return out


def outputs_match(pred, tgt_out):
    """Per row: whether pred, read up to its first EOS, is tgt_out (up to its EOS)."""
    n, w = tgt_out.shape
    p = np.full((n, max(w, pred.shape[1])), PAD)
    p[:, :pred.shape[1]] = pred
    lengths = (tgt_out != PAD).sum(axis=1)              # digits + EOS
    cols = np.arange(p.shape[1])
    gold = np.full_like(p, PAD)
    gold[:, :w] = tgt_out
    right = (p == gold) | (cols >= lengths[:, None])
    return right.all(axis=1)


def exact_match(model, src, tgt_out, batch=500):
    hits = [outputs_match(greedy_decode(model, src[i:i + batch]), tgt_out[i:i + batch])
            for i in range(0, len(src), batch)]
    model.train()
    return float(np.concatenate(hits).mean())


# ---------------------------------------------------------------------------
# Training

def inverse_sigmoid(step, k):
    """Bengio et al.'s eps_i = k / (k + exp(i / k)): the probability of
    feeding the gold token at step i."""
    return k / (k + math.exp(min(step / k, 700.0)))


def train(model, data, eval_set, *, steps, batch_size, lr, warmup, scheduled_sampling_k=None,
          eval_every=100, target=0.99, print_every=50, snapshot_step=None, rng=None, progress=True):
    """Teacher forcing (scheduled_sampling_k None) or scheduled sampling.
    Returns a dict: the time (training only, evaluations not counted) and
    step at which held-out exact match first reached `target`, the last
    exact match, the loss curve, and accuracy_by_position at snapshot_step.
    progress=True shows a progress bar over the steps (attnkit.progress)."""
    rng = np.random.default_rng(0) if rng is None else rng
    criterion = nn.CrossEntropyLoss(ignore_index=PAD)
    opt = optim.AdamW(model, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    schedule = optim.LinearWarmupCosine(opt, warmup_steps=warmup, total_steps=steps, min_lr=lr / 20)
    model.train()
    train_time = 0.0                    # training steps only
    started = time.perf_counter()       # wall clock, held-out evaluations included
    reached = None
    losses, history = [], []
    eval_src, eval_out = eval_set
    match = 0.0
    swapped = swappable = wrong = 0
    snapshot = None
    desc = "scheduled sampling" if scheduled_sampling_k is not None else "teacher forcing"
    with progress_bar(steps, desc=desc, unit="step", enabled=progress) as bar:
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            src, tgt_in, tgt_out = data.batch(batch_size)
            src_pad = src == PAD
            memory = model.encode(src)
            eps = 1.0
            if scheduled_sampling_k is not None:
                eps = inverse_sigmoid(step - 1, scheduled_sampling_k)
                # pass 1: the decoder on the gold input, nothing saved for backward
                with eval_mode(*model.decoder_side()):
                    predicted = model.decode(memory, src_pad, tgt_in).argmax(axis=-1)
                # the input at position p + 1 is the token for position p: swap in
                # the model's prediction for it with probability 1 - eps (BOS and
                # padding stay)
                swap = (rng.random(tgt_in.shape) >= eps) & (tgt_in != PAD)
                swap[:, 0] = False
                swapped += int(swap.sum())
                swappable += int((tgt_in[:, 1:] != PAD).sum())
                mixed = np.where(swap, np.concatenate([tgt_in[:, :1], predicted[:, :-1]], axis=1),
                                 tgt_in)
                wrong += int((mixed != tgt_in).sum())
                tgt_in = mixed
            # pass 2 (or the only pass, with teacher forcing)
            logits = model.decode(memory, src_pad, tgt_in)
            loss = criterion(logits.reshape(-1, VOCAB), tgt_out.reshape(-1))
            model.backward(criterion.backward().reshape(logits.shape))
            optim.clip_grad_norm(model, 1.0)
            opt.step()
            schedule.step()
            opt.zero_grad()
            train_time += time.perf_counter() - t0
            losses.append(loss)
            bar.set_postfix(loss=float(loss))
            bar.update()
            if step % print_every == 0 or step == steps:
                counted = tgt_out != PAD
                token_acc = float((logits.argmax(-1) == tgt_out)[counted].mean())
                line = (f"  step {step:5d}  loss {loss:.4f}  token acc {token_acc:.4f}  "
                        f"elapsed {time.perf_counter() - started:6.1f}s (training {train_time:.1f}s)")
                if scheduled_sampling_k is not None:
                    line += f"  p(gold) {eps:.3f}"
                bar.write(line)
            if step == snapshot_step:
                snapshot = accuracy_by_position(model, eval_src)
                model.train()
            if step % eval_every == 0 or step == steps:
                match = exact_match(model, eval_src, eval_out)
                wall = time.perf_counter() - started
                history.append((step, train_time, wall, match))
                bar.write(f"  step {step:5d}  held-out exact match {match:.4f} (greedy, KV cache)")
                if reached is None and match >= target:
                    reached = (step, train_time, wall)
    model.eval()
    return {"train_time": train_time, "wall_time": time.perf_counter() - started,
            "reached": reached, "final_match": match,
            "losses": losses, "history": history, "snapshot": snapshot,
            "swapped_fraction": swapped / swappable if swappable else 0.0,
            "wrong_input_fraction": wrong / swappable if swappable else 0.0}


# ---------------------------------------------------------------------------
# Measuring exposure bias

def accuracy_by_position(model, src):
    """Token accuracy at each output position on padded source strings src,
    (a) with the gold history (teacher-forced: one pass on the right input),
    (b) with the model's own history (greedy decoding). Position p counts the
    strings that have an output token there (a digit or EOS). Returns
    {"rows": [(p, count, gold-history accuracy, own-history accuracy)],
    "gold_errors", "own_errors"}: the mean number of wrong tokens in the
    strings that have any. (Exact match is the same either way: a string
    right everywhere with the gold history feeds its own, identical, history
    back; so a difference can only come after the first mistake.)"""
    src, tgt_in, tgt_out = batch_arrays(src)
    model.eval()
    gold = model.decode(model.encode(src), src == PAD, tgt_in).argmax(-1)
    own = np.full_like(tgt_out, PAD)
    decoded = greedy_decode(model, src)[:, :tgt_out.shape[1]]
    own[:, :decoded.shape[1]] = decoded
    counted = tgt_out != PAD
    rows = []
    for p in range(tgt_out.shape[1]):
        c = counted[:, p]
        rows.append((p, int(c.sum()), float((gold[c, p] == tgt_out[c, p]).mean()),
                     float((own[c, p] == tgt_out[c, p]).mean())))
    def errors(pred):
        wrong = ((pred != tgt_out) & counted).sum(axis=1)
        return float(wrong[wrong > 0].mean()) if (wrong > 0).any() else 0.0
    return {"rows": rows, "gold_errors": errors(gold), "own_errors": errors(own)}


def recovery_after_mistake(model, src, rng, positions=range(MAX_LEN)):
    """For each j: on the strings with a digit at output position j, feed a
    wrong digit at step j of greedy decoding (one not the right one) and
    count how often every later token (the remaining digits and EOS) still
    comes out right. Returns [(j, count, fraction right)]."""
    src_all, _, tgt_all = batch_arrays(src)
    lengths = (src_all != PAD).sum(axis=1)
    rows = []
    for j in positions:
        sel = lengths > j
        if not sel.any():
            continue
        s, gold = src_all[sel], tgt_all[sel]
        wrong = (gold[:, j] + rng.integers(1, 10, len(s))) % 10
        pred = greedy_decode(model, s, force=(np.full(len(s), j), wrong))
        # positions after j must match; j itself is the forced wrong digit
        w = gold.shape[1]
        p = np.full((len(s), max(w, pred.shape[1])), PAD)
        p[:, :pred.shape[1]] = pred
        cols = np.arange(p.shape[1])
        g = np.full_like(p, PAD)
        g[:, :w] = gold
        lens = lengths[sel] + 1
        ok = ((p == g) | (cols <= j) | (cols >= lens[:, None])).all(axis=1)
        rows.append((j, int(sel.sum()), float(ok.mean())))
    return rows


# ---------------------------------------------------------------------------

CONFIG = dict(d_model=64, nhead=4, num_layers=2, dim_feedforward=128, positions="learned")
FULL = dict(steps=600, batch_size=128, lr=3e-3, warmup=60, eval_every=50, print_every=50,
            snapshot_step=100)
QUICK = dict(steps=120, batch_size=64, lr=3e-3, warmup=20, eval_every=120, print_every=20,
             snapshot_step=60)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a short run that checks the mechanism (~10 s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for attnkit's kernels (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run")
    parser.add_argument("--positions", choices=("learned", "sinusoidal"), default="learned",
                        help="position encoding (sinusoidal learns this task more slowly: give it "
                             "about twice the steps)")
    parser.add_argument("--k", type=float, default=None,
                        help="scheduled sampling's decay constant k (default: from --steps)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        attnkit.set_num_threads(args.threads)
    start = time.perf_counter()
    settings = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        settings["steps"] = args.steps
    steps = settings["steps"]
    # k such that p(gold) falls to 1/2 at 60% of the run (k ln k = 0.6 steps)
    k = args.k if args.k is not None else _k_for_half_at(0.6 * steps)
    rng = np.random.default_rng(args.seed)
    held_out = make_sequences(rng, 300 if args.quick else 1000)
    held_out_src, _, held_out_tgt = batch_arrays(held_out)
    config = dict(CONFIG, positions=args.positions)
    print(f"attnkit {attnkit.__version__}, {attnkit.get_num_threads()} thread(s); model {config}; "
          f"{steps} steps of batch {settings['batch_size']} per training; {len(held_out)} "
          "held-out strings (never trained on)")
    summary = {"threads": attnkit.get_num_threads(), "k": k, "steps": steps}
    models, snapshots = {}, {}
    for key, name, ss_k in (("tf", "teacher forcing", None), ("ss", "scheduled sampling", k)):
        print(f"\n== Training with {name}" +
              (f": p(gold) = k / (k + exp(step / k)), k = {k:.1f}" if ss_k else ""))
        # the same initial weights and the same batches for both trainings
        model = Seq2Seq(**config, rng=np.random.default_rng(args.seed + 1))
        data = TrainingData(np.random.default_rng(args.seed + 2), held_out)
        r = train(model, data, (held_out_src, held_out_tgt), scheduled_sampling_k=ss_k,
                  rng=np.random.default_rng(args.seed + 3), progress=not args.no_progress,
                  **settings)
        models[name], snapshots[name] = model, r["snapshot"]
        if r["reached"]:
            print(f"  first reached 99% held-out exact match at step {r['reached'][0]}: "
                  f"{r['reached'][1]:.1f} s of training steps, {r['reached'][2]:.1f} s wall clock "
                  "with the evaluations")
        else:
            print(f"  did not reach 99% held-out exact match (last: {r['final_match']:.4f})")
        print(f"  training took {r['train_time']:.1f} s ({r['wall_time']:.1f} s with the evaluations)")
        if ss_k:
            print(f"  decoder inputs replaced by the model's prediction: {r['swapped_fraction']:.1%}; "
                  f"inputs that were then wrong (not the gold token): {r['wrong_input_fraction']:.2%}")
        summary.update({f"{key}_train_time": r["train_time"], f"{key}_final_match": r["final_match"],
                        f"{key}_time_to_99": None if r["reached"] is None else r["reached"][1],
                        f"{key}_wall_time_to_99": None if r["reached"] is None else r["reached"][2],
                        f"{key}_step_to_99": None if r["reached"] is None else r["reached"][0],
                        f"{key}_first_loss": float(np.mean(r["losses"][:5])),
                        f"{key}_last_loss": float(np.mean(r["losses"][-10:])),
                        f"{key}_swapped_fraction": r["swapped_fraction"],
                        f"{key}_wrong_input_fraction": r["wrong_input_fraction"],
                        # the curves, for a plot: loss per step, (step, exact match) per evaluation
                        f"{key}_losses": [float(x) for x in r["losses"]],
                        f"{key}_exact_match": [(step, match) for step, _, _, match in r["history"]]})
    summary["expected_swapped_fraction"] = float(np.mean(
        [1 - inverse_sigmoid(i, k) for i in range(steps)]))

    # the KV cache is a speed-up only: it must decode exactly what recomputing
    # the whole prefix at every step decodes
    model = models["teacher forcing"]
    cached = greedy_decode(model, held_out_src[:100])
    full = greedy_decode(model, held_out_src[:100], use_cache=False)
    summary["kv_cache_equals_recompute"] = bool(np.array_equal(cached, full))
    print(f"\ngreedy decoding with the KV cache "
          f"{'equals' if summary['kv_cache_equals_recompute'] else 'DIFFERS FROM'} greedy decoding "
          "that recomputes the whole prefix at every step (100 strings)")
    show_examples(models, held_out)
    summary.update(report_exposure_bias(models, snapshots, settings["snapshot_step"], held_out,
                                        np.random.default_rng(args.seed + 4)))
    summary["total_time"] = time.perf_counter() - start
    print(f"\ntotal time {summary['total_time']:.1f} s")
    summary["models"] = models
    return summary


def _k_for_half_at(step):
    """k with k ln k = step: eps_i = k / (k + e^(i/k)) is 1/2 at that step."""
    k = max(step / 5.0, 2.0)
    for _ in range(50):
        k = step / math.log(k)
    return k


def render(tokens):
    """Tokens as text, up to the first EOS."""
    out = []
    for t in tokens:
        out.append(NAMES[int(t)])
        if t == EOS:
            break
    return " ".join(out)


def show_examples(models, held_out, positions=(0, 3)):
    """One held-out string decoded by each model, freely and with a wrong
    digit forced at a few positions."""
    src, _, tgt = batch_arrays(held_out[:1])
    print(f"\n== An example: {render(src[0][src[0] != PAD])}  ->  {render(tgt[0])}")
    for name, model in models.items():
        print(f"   {name}:")
        print(f"     {'free':>12s}  {render(greedy_decode(model, src)[0])}")
        for j in positions:
            wrong = (tgt[0, j] + 5) % 10
            pred = greedy_decode(model, src, force=(np.array([j]), np.array([wrong])))[0]
            print(f"     {'forced ' + str(wrong) + ' at ' + str(j):>12s}  {render(pred)}")


def report_exposure_bias(models, snapshots, snapshot_step, held_out, rng):
    """Print the two exposure-bias tables; return their figures."""
    short = {"teacher forcing": "tf", "scheduled sampling": "ss"}
    names = list(models)
    final = {n: accuracy_by_position(m, held_out) for n, m in models.items()}
    out = {}
    print("\n== Token accuracy by output position on the held-out strings (TF: teacher forcing,")
    print(f"   SS: scheduled sampling; after {snapshot_step} training steps, and at the end). gold: the")
    print("   right history as the decoder's input (one teacher-forced pass); own: greedy decoding,")
    print("   the model's own outputs as its input")
    tables = [(f"{short[n].upper()} @{snapshot_step}", snapshots[n]) for n in names]
    tables += [(f"{short[n].upper()} end", final[n]) for n in names]
    print("              " + "".join(f"{label:^18s}" for label, _ in tables))
    print("   pos     n  " + "    gold     own  " * len(tables))
    for i, (p, count, _, _) in enumerate(final[names[0]]["rows"]):
        print(f"  {p:4d}  {count:4d}  " + "".join(f"  {t['rows'][i][2]:6.4f}  {t['rows'][i][3]:6.4f}  "
                                               for _, t in tables))
    print("  wrong tokens  " + "".join(f"  {t['gold_errors']:6.2f}  {t['own_errors']:6.2f}  "
                                       for _, t in tables))
    print("  (mean number of wrong tokens in a string that has any)")
    for n in names:
        for when, table in (("mid", snapshots[n]), ("end", final[n])):
            out[f"{short[n]}_{when}_gold_errors"] = table["gold_errors"]
            out[f"{short[n]}_{when}_own_errors"] = table["own_errors"]
            out[f"{short[n]}_{when}_by_position"] = [(p, g, o) for p, _, g, o in table["rows"]]

    print("\n== One wrong digit forced at output position j during greedy decoding: the fraction")
    print("   of strings whose every later token (the remaining digits and EOS) still comes out right")
    print("     j     n" + "".join(f"{n:>21s}" for n in names))
    rec = {n: recovery_after_mistake(m, held_out, np.random.default_rng(rng.integers(2**32)))
           for n, m in models.items()}
    for i, (j, count, _) in enumerate(rec[names[0]]):
        print(f"  {j:4d}  {count:4d}" + "".join(f"{rec[n][i][2]:21.4f}" for n in names))
    for n in names:
        total = sum(c for _, c, _ in rec[n])
        out[f"{short[n]}_recovery"] = sum(c * f for _, c, f in rec[n]) / total
        out[f"{short[n]}_recovery_by_j"] = [(j, f) for j, _, f in rec[n]]
    print("   all      " + "".join(f"{out[short[n] + '_recovery']:21.4f}" for n in names))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
