"""Draw the guide's figures into docs/figures/: `python docs/make_figures.py`.

Each figure is made from attnkit's public API, so the pictures show what the
code computes. CI runs this script; the site is built from its output.
"""
import contextlib
import importlib.util
import io
import pathlib

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402

from attnkit import nn, plot  # noqa: E402
from attnkit.models import SentenceEncoder, find_checkpoint  # noqa: E402

FIGURES = pathlib.Path(__file__).resolve().parent / "figures"


def minilm_heads(path):
    """all-MiniLM-L6-v2's heads, first and last layer, on one sentence."""
    encoder = SentenceEncoder.from_pretrained(find_checkpoint())
    encoding = encoder.tokenizer.encode("The cat sat on the mat because it was tired.")
    ids, mask = np.array([encoding.ids]), np.array([encoding.attention_mask])
    out = encoder.model(ids, mask, output_attentions=True)
    layers = [0, len(out.attentions) - 1]
    fig = plot.attention_grid([a[0] for a in out.attentions], tokens=encoding.tokens, layers=layers,
                              heads=range(6), title="all-MiniLM-L6-v2: heads 0-5 of the first and last layer")
    fig.savefig(path, dpi=90)


def sinusoidal_encoding(path):
    """The sinusoidal position encoding, 64 positions of 128 features."""
    ax = plot.positional_encoding_heatmap(nn.sinusoidal_positional_encoding(64, 128),
                                          title="sinusoidal position encoding (64 positions, 128 features)")
    ax.figure.savefig(path, dpi=90, bbox_inches="tight")


def softmax_saturation(path):
    """Softmax's saturation and gradient against d_k, with and without the scale."""
    plot.softmax_saturation().savefig(path, dpi=90, bbox_inches="tight")


def cost_vs_length(path):
    """Time (measured here) and memory of fused against naive attention."""
    plot.cost_vs_length().savefig(path, dpi=90, bbox_inches="tight")


def layer_vs_batch_norm(path):
    """The guide's padded batch (question 19), normalised by each."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 3)) * 2 + 5
    pad = np.array([[False] * 4, [False, False, True, True]])
    x[pad] = 0.0
    partner = rng.standard_normal((1, 4, 3)) * 2 + 5
    fig, _ = plot.layer_vs_batch_norm(x, pad, sentence=1, token=0, partner=partner)
    fig.savefig(path, dpi=90, bbox_inches="tight")


def teacher_forcing_lesson():
    """examples/teacher_forcing.py's full run (about a minute and a half on
    two cores): the module, and what its main() returns."""
    script = FIGURES.parent.parent / "examples" / "teacher_forcing.py"
    spec = importlib.util.spec_from_file_location("teacher_forcing", script)
    lesson = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lesson)
    with contextlib.redirect_stdout(io.StringIO()):                 # its progress lines
        figures = lesson.main(["--no-progress"])
    return lesson, figures


def teacher_forcing_curves(path, figures):
    """Loss and held-out exact match of the lesson, teacher forcing against
    scheduled sampling."""
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_match) = plt.subplots(1, 2, figsize=(11, 3.6))
    plot.training_curves({"teacher forcing": figures["tf_losses"],
                          "scheduled sampling": figures["ss_losses"]},
                         ylabel="cross-entropy", smooth=5, ax=ax_loss, log_y=True,
                         title="training loss")
    plot.training_curves({"teacher forcing": figures["tf_exact_match"],
                          "scheduled sampling": figures["ss_exact_match"]},
                         ylabel="held-out exact match", ax=ax_match,
                         title="greedy decoding with a KV cache")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def reversal_cross_attention(path, lesson, figures):
    """The cross-attention of the lesson's trained model (teacher forcing),
    both decoder layers, heads averaged, on one held-out string: to write
    the reversed string, each output step looks up the source digit it must
    copy."""
    model = figures["models"]["teacher forcing"]
    source = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    src, tgt_in, _ = lesson.batch_arrays(source)
    memory = model.encode(src)
    x = model.tgt_pos(model.tgt_embed(tgt_in))
    maps = []
    for layer in model.decoder.layers:
        x, (_, cross) = layer(x, memory, tgt_is_causal=True, memory_key_padding_mask=src == lesson.PAD,
                              need_weights=True)
        maps.append(cross[0].mean(axis=0))                          # heads averaged: (L, S)
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(maps), figsize=(4.6 * len(maps), 4.2))
    rows = [lesson.NAMES[t] for t in tgt_in[0]]
    cols = [lesson.NAMES[t] for t in src[0]]
    for i, (ax, weights) in enumerate(zip(axes, maps)):
        plot.attention_heatmap(weights, rows, cols, ax=ax, colorbar=False,
                               title=f"decoder layer {i}, heads averaged")
        ax.set_xlabel("encoder token (key)")
        ax.set_ylabel("decoder input (query)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    FIGURES.mkdir(exist_ok=True)
    minilm_heads(FIGURES / "minilm_heads.png")
    sinusoidal_encoding(FIGURES / "sinusoidal_encoding.png")
    softmax_saturation(FIGURES / "softmax_saturation.png")
    cost_vs_length(FIGURES / "cost_vs_length.png")
    layer_vs_batch_norm(FIGURES / "layer_vs_batch_norm.png")
    lesson, figures = teacher_forcing_lesson()
    teacher_forcing_curves(FIGURES / "teacher_forcing_curves.png", figures)
    reversal_cross_attention(FIGURES / "reversal_cross_attention.png", lesson, figures)
    print(f"figures written to {FIGURES}")


if __name__ == "__main__":
    main()
