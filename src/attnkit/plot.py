"""attnkit.plot: pictures of what attention computes, with matplotlib.

matplotlib is an optional extra (`pip install "attnkit[plot]"`); `import
attnkit` never imports it, and this module imports it only when a function
here is called.

    >>> import numpy as np
    >>> from attnkit import plot
    >>> w = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    >>> ax = plot.attention_heatmap(w, query_tokens=["the", "cat"],
    ...                             key_tokens=["le", "chat", "noir"])
    >>> [t.get_text() for t in ax.get_xticklabels()]
    ['le', 'chat', 'noir']

Each function draws into the axes (or figure) it is given, or a new one,
and returns it, so a caller can add to it, save it (`ax.figure.savefig(...)`)
or show it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import numpy.typing as npt
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["attention_heatmap", "attention_grid", "positional_encoding_heatmap",
           "softmax_saturation", "cost_vs_length", "training_curves", "layer_vs_batch_norm"]


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("attnkit.plot needs matplotlib: pip install \"attnkit[plot]\" "
                          "(or pip install matplotlib)") from None
    return plt


def _labels(tokens: Any, length: int, name: str, func: str) -> list[str] | None:
    if tokens is None:
        return None
    tokens = [str(t) for t in tokens]
    if len(tokens) != length:
        raise ValueError(f"{func}: {name} has {len(tokens)} tokens but the weights have {length} "
                         f"{'rows' if name == 'query_tokens' else 'columns'}")
    return tokens


def attention_heatmap(weights: npt.ArrayLike, query_tokens: Sequence[object] | None = None,
                      key_tokens: Sequence[object] | None = None, *, ax: Axes | None = None,
                      title: str | None = None, cmap: str = "viridis", colorbar: bool = True,
                      annotate: bool = False) -> Axes:
    """One head's weights (L, S) as a heatmap: row i is what query i attends
    to, column j key j; darker is less. query_tokens (L) and key_tokens (S)
    label the rows and columns (key_tokens defaults to query_tokens for
    self-attention). annotate=True writes each weight in its cell (for small
    matrices). Returns the axes."""
    func = "attention_heatmap"
    w = np.asarray(weights)
    if w.ndim != 2:
        raise ValueError(f"{func}: weights must be (L, S), one head's; got shape {w.shape} "
                         "(for several heads or layers, use attention_grid)")
    if key_tokens is None and query_tokens is not None and w.shape[0] == w.shape[1]:
        key_tokens = query_tokens
    rows = _labels(query_tokens, w.shape[0], "query_tokens", func)
    cols = _labels(key_tokens, w.shape[1], "key_tokens", func)
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(1.0 + 0.45 * w.shape[1], 0.8 + 0.4 * w.shape[0]))
    image = ax.imshow(w, cmap=cmap, vmin=0.0, vmax=max(1e-12, float(np.nanmax(w))) if w.size else 1.0,
                      aspect="auto")
    ax.set_xticks(range(w.shape[1]))
    ax.set_yticks(range(w.shape[0]))
    if cols is not None:
        ax.set_xticklabels(cols, rotation=60, ha="right")
    if rows is not None:
        ax.set_yticklabels(rows)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    if annotate:
        for i in range(w.shape[0]):
            for j in range(w.shape[1]):
                ax.text(j, i, f"{w[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if w[i, j] < 0.5 * np.nanmax(w) else "black")
    if title:
        ax.set_title(title)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return ax


def attention_grid(attentions: npt.ArrayLike | Sequence[npt.ArrayLike],
                   tokens: Sequence[object] | None = None, *, layers: Sequence[int] | None = None,
                   heads: Sequence[int] | None = None, cmap: str = "viridis",
                   cell_size: float = 1.6, title: str | None = None) -> Figure:
    """Every head of every layer, a grid of heatmaps: rows are layers,
    columns heads. attentions: one sample's weights per layer, a sequence of
    (H, L, L) arrays (e.g. [a[n] for a in BertModel(..., output_attentions=
    True).attentions]), or one (layers, H, L, L) array, or one layer's (H, L,
    S). tokens (L) label the axes of the outer cells. layers, heads: which to
    draw (indices; default all). Returns the figure."""
    func = "attention_grid"
    stack = np.asarray(attentions) if not isinstance(attentions, (list, tuple)) else \
        np.stack([np.asarray(a) for a in attentions])
    if stack.ndim == 3:
        stack = stack[None]
    if stack.ndim != 4:
        raise ValueError(f"{func}: attentions must be (layers, heads, L, S) or a sequence of "
                         f"(heads, L, S) per layer, for one sample; got shape {stack.shape}")
    layers = range(stack.shape[0]) if layers is None else list(layers)
    heads = range(stack.shape[1]) if heads is None else list(heads)
    layers, heads = list(layers), list(heads)
    if not layers or not heads:
        raise ValueError(f"{func}: nothing to draw (layers {layers}, heads {heads})")
    labels = _labels(tokens, stack.shape[2], "tokens", func)
    plt = _pyplot()
    fig, axes = plt.subplots(len(layers), len(heads), squeeze=False,
                             figsize=(cell_size * len(heads) + 1, cell_size * len(layers) + 0.5))
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            ax = axes[r, c]
            ax.imshow(stack[layer, head], cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
            if labels is not None and r == len(layers) - 1 and stack.shape[3] == len(labels):
                ax.set_xticks(range(len(labels)))
                ax.set_xticklabels(labels, rotation=90, fontsize=6)
            if labels is not None and c == 0:
                ax.set_yticks(range(len(labels)))
                ax.set_yticklabels(labels, fontsize=6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def positional_encoding_heatmap(table: npt.ArrayLike, *, ax: Axes | None = None,
                                title: str = "positional encoding", cmap: str = "RdBu_r") -> Axes:
    """A position-encoding table (positions, dim), e.g.
    nn.sinusoidal_positional_encoding(64, 128) or a learned embedding's
    weight, as a heatmap: a row per position, a column per feature (the
    sinusoidal one's low features turn fast, its high ones slowly). Returns
    the axes."""
    t = np.asarray(table)
    if t.ndim != 2:
        raise ValueError(f"positional_encoding_heatmap: table must be (positions, dim), got shape {t.shape}")
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    limit = max(1e-12, float(np.nanmax(np.abs(t)))) if t.size else 1.0
    image = ax.imshow(t, cmap=cmap, vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xlabel("feature")
    ax.set_ylabel("position")
    if title:
        ax.set_title(title)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return ax


def saturation_table(dims: Sequence[int] = (4, 16, 64, 256, 1024), keys: int = 8,
                     queries: int = 1000, seed: int = 0) -> dict[str, dict[str, npt.NDArray[np.float64]]]:
    """What softmax_saturation draws, as numbers: for each d_k, scores of
    random unit-variance queries against `keys` keys, unscaled and divided by
    sqrt(d_k); returns {"unscaled": ..., "scaled": ...}, each a dict of
    arrays over dims: "top_weight" (the largest weight, averaged over
    queries), "entropy" (of each query's weights, averaged; ln(keys) when
    even) and "gradient" (the mean |d loss / d score| that softmax passes back
    for a random upstream gradient)."""
    from . import functional as F
    rng = np.random.default_rng(seed)
    table: dict[str, dict[str, list[float]]] = {
        name: {"top_weight": [], "entropy": [], "gradient": []} for name in ("unscaled", "scaled")}
    for d in dims:
        q, k = rng.standard_normal((queries, d)), rng.standard_normal((keys, d))
        upstream = rng.standard_normal((queries, keys))
        for name, scale in (("unscaled", 1.0), ("scaled", 1 / np.sqrt(d))):
            p = F.softmax(q @ k.T * scale)
            row = table[name]
            row["top_weight"].append(float(p.max(axis=-1).mean()))
            row["entropy"].append(float(-(p * np.log(np.maximum(p, 1e-300))).sum(axis=-1).mean()))
            row["gradient"].append(float(np.abs(F.softmax_backward(upstream, p)).mean()))
    return {name: {key: np.array(v) for key, v in row.items()} for name, row in table.items()}


def softmax_saturation(dims: Sequence[int] = (4, 16, 64, 256, 1024), keys: int = 8, *,
                       seed: int = 0) -> Figure:
    """Why attention divides by sqrt(d_k): as d_k grows, unscaled scores
    saturate softmax (the top weight goes to 1, the entropy to 0) and the
    gradient through it vanishes; scaled ones stay put. Three panels against
    d_k (saturation_table's numbers). Returns the figure."""
    table = saturation_table(dims, keys, seed=seed)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    titles = {"top_weight": "largest weight", "entropy": f"entropy (even: ln {keys} = {np.log(keys):.2f})",
              "gradient": "mean |gradient| to the scores"}
    for ax, key in zip(axes, ("top_weight", "entropy", "gradient")):
        for name, style in (("unscaled", "o-"), ("scaled", "s--")):
            ax.plot(dims, table[name][key], style, label=f"{name}" if name == "unscaled" else "/ sqrt(d_k)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("d_k")
        ax.set_title(titles[key], fontsize=10)
    axes[0].legend()
    fig.tight_layout()
    return fig


def cost_vs_length(lengths: Sequence[int] = (256, 512, 1024, 2048, 4096), heads: int = 8,
                   head_dim: int = 64, *, naive_limit: int = 2048, repeat: int = 3) -> Figure:
    """Time and memory of self-attention against sequence length, attnkit's
    fused kernel beside the naive computation (the (L, L) scores
    materialised, attnkit.reference in float32), one sequence of `heads`
    heads. Time is measured here (the best of `repeat`); memory is what each
    must hold beyond q, k, v and the output: the naive one the scores and
    weights, 2 H L^2 floats, the fused one a tile per thread, drawn as a 1 MB
    bound (`python bench/memory.py` measures no growth of the process's peak
    beyond the output at L = 16384). Returns the
    figure (and the measured times in fig.attnkit_times)."""
    import time

    from . import functional as F
    from . import reference
    rng = np.random.default_rng(0)
    fused, naive = [], []
    for L in lengths:
        q, k, v = (rng.standard_normal((heads, L, head_dim), dtype=np.float32) for _ in range(3))
        runs = []
        for _ in range(repeat):
            t = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v)
            runs.append(time.perf_counter() - t)
        fused.append(min(runs))
        if L <= naive_limit:
            t = time.perf_counter()
            reference.scaled_dot_product_attention(q, k, v, dtype=np.float32)
            naive.append(time.perf_counter() - t)
    plt = _pyplot()
    fig, (ax_time, ax_memory) = plt.subplots(1, 2, figsize=(10, 3.4))
    ax_time.plot(lengths, fused, "o-", label="attnkit (fused)")
    ax_time.plot(lengths[:len(naive)], naive, "s--", label="naive (scores stored)")
    ax_time.set_xscale("log", base=2)
    ax_time.set_yscale("log")
    ax_time.set_xlabel("sequence length L")
    ax_time.set_ylabel("seconds")
    ax_time.set_title(f"time, {heads} heads of {head_dim}", fontsize=10)
    ax_time.legend()
    lengths_arr = np.array(lengths, dtype=float)
    ax_memory.plot(lengths, 2 * heads * lengths_arr**2 * 4 / 2**20, "s--", label="naive: scores and weights")
    ax_memory.plot(lengths, np.full(len(lengths), 1.0), "o-", label="attnkit: under 1 MB of tiles (a bound)")
    ax_memory.set_xscale("log", base=2)
    ax_memory.set_yscale("log")
    ax_memory.set_xlabel("sequence length L")
    ax_memory.set_ylabel("MB beyond inputs and output")
    ax_memory.set_title("memory", fontsize=10)
    ax_memory.legend()
    fig.tight_layout()
    fig.attnkit_times = {"lengths": list(lengths), "fused": fused, "naive": naive}
    return fig


def training_curves(curves: Mapping[str, Sequence[Any]], *,
                    ylabel: str = "loss", title: str | None = None, smooth: int = 1,
                    ax: Axes | None = None, log_y: bool = False) -> Axes:
    """Lines of a value against training step, one per run: curves maps a
    run's name to a sequence of values (one per step, counted from 1) or of
    (step, value) pairs. smooth > 1 draws the running mean over that many
    steps (the raw values faintly behind it). Returns the axes. For teacher
    forcing against scheduled sampling: examples/teacher_forcing.py's main()
    returns tf_losses / ss_losses and tf_exact_match / ss_exact_match."""
    if not curves:
        raise ValueError("training_curves: no curves given")
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.6))
    for name, values in curves.items():
        values = list(values)
        if values and np.ndim(values[0]) == 1:
            steps, ys = (np.array(a, dtype=float) for a in zip(*values))
        else:
            ys = np.asarray(values, dtype=float)
            steps = np.arange(1, len(ys) + 1, dtype=float)
        if smooth > 1 and len(ys) >= smooth:
            line, = ax.plot(steps, ys, alpha=0.25)
            mean = np.convolve(ys, np.ones(smooth) / smooth, mode="valid")
            ax.plot(steps[smooth - 1:], mean, color=line.get_color(), label=name)
        else:
            ax.plot(steps, ys, marker="o" if len(ys) < 30 else None, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend()
    return ax


def layer_vs_batch_norm(x: npt.ArrayLike, padding_mask: npt.ArrayLike, sentence: int = 1,
                        token: int = 0,
                        partner: npt.ArrayLike | None = None) -> tuple[Figure, dict[str, npt.NDArray[Any]]]:
    """Layer norm against batch norm (training mode, the batch's statistics)
    on a padded batch of sentences x (N, L, C) with padding_mask (N, L), True
    = padded: bars of one token's normalised features (sentence `sentence`,
    position `token`) as each computes them. Layer norm: in the batch and
    alone, the same. Batch norm: with the padding counted, with it masked,
    and with the sentence in a batch beside `partner` (N', L, C) instead;
    all different. Returns (figure, {label: values})."""
    from .nn import BatchNorm1d, LayerNorm
    x = np.asarray(x, dtype=np.float64)
    mask = np.asarray(padding_mask, dtype=bool)
    if x.ndim != 3 or mask.shape != x.shape[:2]:
        raise ValueError(f"layer_vs_batch_norm: x must be (N, L, C) and padding_mask (N, L), got "
                         f"{x.shape} and {mask.shape}")
    C = x.shape[2]
    length = int((~mask[sentence]).sum())
    alone = x[sentence:sentence + 1, :length]

    def batch_norm(batch: npt.ArrayLike, batch_mask: npt.ArrayLike | None = None) -> Any:
        return BatchNorm1d(C, channels_last=True, dtype=np.float64)(batch, padding_mask=batch_mask)

    layer_norm = LayerNorm(C, dtype=np.float64)
    values = {"layer norm, in the batch": layer_norm(x)[sentence, token],
              "layer norm, alone": layer_norm(alone)[0, token],
              "batch norm, padding counted": batch_norm(x)[sentence, token],
              "batch norm, padding masked": batch_norm(x, mask)[sentence, token]}
    if partner is not None:
        partner = np.asarray(partner, dtype=np.float64)
        batch = np.concatenate([x[sentence:sentence + 1], partner])
        batch_mask = np.concatenate([mask[sentence:sentence + 1], np.zeros(partner.shape[:2], bool)])
        values["batch norm, another partner"] = batch_norm(batch, batch_mask)[0, token]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(values)
    for i, (label, v) in enumerate(values.items()):
        ax.bar(np.arange(C) + (i - (len(values) - 1) / 2) * width, v, width, label=label,
               hatch="//" if label.startswith("layer") else None)
    ax.set_xticks(range(C))
    ax.set_xlabel("feature")
    ax.set_ylabel("normalised value")
    ax.set_title(f"sentence {sentence}, token {token}: the same numbers in, normalised five ways", fontsize=10)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig, values
