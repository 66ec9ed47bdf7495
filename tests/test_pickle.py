"""Every module of attnkit.nn, and attnkit.models' BertModel and
SentenceEncoder, survives pickle (the default and the highest protocol) and
copy.deepcopy: the copy computes bit for bit what the original does, and is
its own object (changing the copy's weights, caches or generators leaves the
original alone).

CASES is the parametrisation; test_every_public_class_is_covered fails when
a class joins attnkit.nn.__all__ without a case here.
"""
import copy
import inspect
import pickle

import numpy as np
import pytest

import attnkit.functional as F
from attnkit import nn
from attnkit.models import BertConfig, BertModel, SentenceEncoder, find_checkpoint
from attnkit.nn.layers import LINEAR_ACTIVATION_NAMES
from accuracy import needs_checkpoint

COPIERS = {
    "pickle-default": lambda obj: pickle.loads(pickle.dumps(obj)),
    "pickle-highest": lambda obj: pickle.loads(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)),
    "deepcopy": copy.deepcopy,
}
ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "silu", "sigmoid"]


def seeded(seed=0):
    return np.random.default_rng(seed)


def data(*shape, seed=1, dtype=np.float32):
    return seeded(seed).standard_normal(shape).astype(dtype)


class UserModule(nn.Module):
    """A user's subclass of Module, as the README shows them: pickling must not
    depend on anything attnkit's own subclasses do."""

    def __init__(self, rng):
        super().__init__()
        self.proj = nn.Linear(6, 4, rng=rng)
        self.register_parameter("scale", np.full(4, 2.0, np.float32))
        self.register_buffer("steps", np.zeros((), np.int64))

    def forward(self, x):
        self.steps += 1
        return self.proj(x) * self.scale


class Case:
    """build() -> a subject (a module, or a tuple holding one with its KV
    cache); run(subject) -> an array or a tuple of them (None allowed). run
    may change the subject's state (a cache, running statistics, a
    generator), which is why the copies are compared call by call."""

    def __init__(self, id, cls, build, run):
        self.id, self.cls, self.build, self.run = id, cls, build, run


def _mha_run(query_shape, key_shape=None, value_shape=None, **kwargs):
    def run(m):
        q = data(*query_shape)
        k = q if key_shape is None else data(*key_shape, seed=2)
        v = k if value_shape is None else data(*value_shape, seed=3)
        return m(q, k, v, **kwargs)
    return run


def _cached_decoding(subject):
    attn, cache = subject
    x = data(2, 1 + len(cache) % 3, 8, seed=len(cache))   # each call a new step, its own length
    return attn(x, x, x, kv_cache=cache, is_causal=True)


def _kv_append(cache):
    s = 1 + len(cache) % 2
    k, v = data(2, 3, s, 4, seed=len(cache)), data(2, 3, s, 4, seed=100 + len(cache))
    return tuple(np.copy(a) for a in cache.append(k, v))


def _encoder_layer(activation, **kwargs):
    return lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, activation=activation,
                                              batch_first=True, rng=seeded(), **kwargs)


def _decoder_layer(activation, **kwargs):
    return lambda: nn.TransformerDecoderLayer(8, 2, 16, dropout=0.1, activation=activation,
                                              batch_first=True, rng=seeded(), **kwargs)


def _tiny_bert():
    config = BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=12, hidden_act="gelu_new")
    return BertModel(config, rng=seeded()).eval()


def _bert_run(model):
    ids = seeded(5).integers(0, 40, (3, 7))
    mask = np.ones((3, 7), np.int64)
    mask[1, 4:] = 0
    return model(ids, attention_mask=mask)


def x3(module):
    return module(data(3, 5, 8))                        # (N, L, features)


CASES = [
    Case("Module-user-subclass", nn.Module, lambda: UserModule(seeded()), lambda m: m(data(3, 6))),
    Case("Linear", nn.Linear, lambda: nn.Linear(8, 5, rng=seeded()), x3),
    Case("Linear-no-bias-float64", nn.Linear,
         lambda: nn.Linear(8, 5, bias=False, dtype=np.float64, rng=seeded()),
         lambda m: m(data(3, 8, dtype=np.float64))),
    Case("LayerNorm", nn.LayerNorm, lambda: nn.LayerNorm(8), x3),
    Case("RMSNorm", nn.RMSNorm, lambda: nn.RMSNorm(8, eps=1e-6), x3),
    Case("BatchNorm1d-train", nn.BatchNorm1d, lambda: nn.BatchNorm1d(8, momentum=None),
         lambda m: m(data(4, 8))),
    Case("BatchNorm1d-eval", nn.BatchNorm1d, lambda: nn.BatchNorm1d(8).eval(),
         lambda m: m(data(4, 8, 3))),
    Case("Dropout-train", nn.Dropout, lambda: nn.Dropout(0.3, rng=seeded()), x3),
    Case("Embedding", nn.Embedding, lambda: nn.Embedding(10, 4, padding_idx=0, rng=seeded()),
         lambda m: m(seeded(2).integers(0, 10, (3, 5)))),
    Case("Identity", nn.Identity, nn.Identity, x3),
    Case("ReLU", nn.ReLU, nn.ReLU, x3),
    Case("GELU", nn.GELU, nn.GELU, x3),
    Case("GELU-tanh", nn.GELU, lambda: nn.GELU("tanh"), x3),
    Case("SiLU", nn.SiLU, nn.SiLU, x3),
    Case("Sigmoid", nn.Sigmoid, nn.Sigmoid, x3),
    Case("Tanh", nn.Tanh, nn.Tanh, x3),
    Case("CrossEntropyLoss", nn.CrossEntropyLoss,
         lambda: nn.CrossEntropyLoss(weight=np.linspace(0.5, 2, 8), label_smoothing=0.1),
         lambda c: (np.array(c(data(4, 8), np.arange(4))), c.backward())),
    Case("BCEWithLogitsLoss", nn.BCEWithLogitsLoss,
         lambda: nn.BCEWithLogitsLoss(pos_weight=np.full(8, 2.0), reduction="sum"),
         lambda c: (np.array(c(data(4, 8), data(4, 8, seed=2) > 0)), c.backward())),
    Case("MSELoss", nn.MSELoss, lambda: nn.MSELoss(reduction="none"),
         lambda c: (c(data(4, 8), data(4, 8, seed=2)), c.backward())),
    Case("Sequential", nn.Sequential,
         lambda: nn.Sequential([nn.Linear(8, 6, rng=seeded()), nn.GELU("tanh"), nn.Dropout(0.2, rng=seeded(1)),
                                nn.Linear(6, 3, rng=seeded(2))]), x3),
    Case("ModuleList", nn.ModuleList,
         lambda: nn.ModuleList([nn.Linear(8, 8, rng=seeded()), nn.LayerNorm(8)]),
         lambda ms: tuple(m(data(2, 8)) for m in ms)),
    Case("MultiHeadAttention", nn.MultiHeadAttention,
         lambda: nn.MultiHeadAttention(8, 2, dropout=0.2, rng=seeded()),      # training: dropout draws
         _mha_run((5, 3, 8), (6, 3, 8), (6, 3, 8), average_attn_weights=False)),
    Case("MultiHeadAttention-self-batch-first", nn.MultiHeadAttention,
         lambda: nn.MultiHeadAttention(8, 2, batch_first=True, rng=seeded()).eval(),
         _mha_run((3, 5, 8), is_causal=True)),
    Case("MultiHeadAttention-kdim-bias-kv-zero-attn-gqa", nn.MultiHeadAttention,
         lambda: nn.MultiHeadAttention(8, 4, kdim=6, vdim=5, add_bias_kv=True, add_zero_attn=True,
                                       num_kv_heads=2, batch_first=True, rng=seeded()).eval(),
         _mha_run((3, 5, 8), (3, 4, 6), (3, 4, 5), key_padding_mask=np.eye(3, 4, dtype=bool))),
    Case("MultiHeadAttention-with-KVCache", nn.MultiHeadAttention,
         lambda: (nn.MultiHeadAttention(8, 2, num_kv_heads=1, batch_first=True, rng=seeded()).eval(),
                  nn.KVCache()),
         _cached_decoding),
    Case("KVCache", nn.KVCache, nn.KVCache, _kv_append),
    *[Case(f"Attention-{score}-{norm}", nn.Attention,
           (lambda score=score, norm=norm: nn.Attention(8, 8, score=score, normalizer=norm,
                                                        hidden_dim=6, rng=seeded())),
           lambda m: m(data(3, 5, 8), data(3, 4, 8, seed=2), data(3, 4, 7, seed=3),
                       mask=np.tri(5, 4, dtype=bool)))
      for score, norm in [("scaled_dot", "softmax"), ("dot", "sigmoid"), ("general", "relu"),
                          ("additive", "softmax")]],
    Case("SinusoidalPositionalEncoding", nn.SinusoidalPositionalEncoding,
         lambda: nn.SinusoidalPositionalEncoding(8, max_length=10),
         lambda m: (m(data(3, 5, 8), offset=2), m(data(3, 5, 8), offset=9))),
    Case("LearnedPositionalEmbedding", nn.LearnedPositionalEmbedding,
         lambda: nn.LearnedPositionalEmbedding(10, 8, rng=seeded()),
         lambda m: m(data(3, 5, 8), offset=5)),
    Case("RotaryEmbedding", nn.RotaryEmbedding, lambda: nn.RotaryEmbedding(8, base=500.0, interleaved=True),
         lambda m: (m(data(2, 5, 8), offset=3), m(data(2, 3, 8), positions=[0.5, 2, 7]))),
    *[Case(f"TransformerEncoderLayer-{activation}", nn.TransformerEncoderLayer,
           _encoder_layer(activation), x3) for activation in ACTIVATIONS],
    Case("TransformerEncoderLayer-norm-first-callable", nn.TransformerEncoderLayer,
         _encoder_layer(F.silu, norm_first=True), x3),
    Case("TransformerEncoderLayer-module-activation", nn.TransformerEncoderLayer,
         _encoder_layer(nn.GELU("tanh")), x3),
    *[Case(f"TransformerDecoderLayer-{activation}", nn.TransformerDecoderLayer,
           _decoder_layer(activation, norm_first=activation == "gelu"),
           lambda m: m(data(3, 4, 8), data(3, 6, 8, seed=2), tgt_is_causal=True))
      for activation in ACTIVATIONS],
    *[Case(f"TransformerEncoder-{activation}", nn.TransformerEncoder,
           (lambda activation=activation: nn.TransformerEncoder(
               _encoder_layer(activation)(), 2, norm=nn.LayerNorm(8))), x3)
      for activation in ACTIVATIONS],
    *[Case(f"TransformerDecoder-{activation}", nn.TransformerDecoder,
           (lambda activation=activation: nn.TransformerDecoder(_decoder_layer(activation)(), 2)),
           lambda m: m(data(3, 4, 8), data(3, 6, 8, seed=2), tgt_is_causal=True))
      for activation in ACTIVATIONS],
    Case("BertModel-tiny", BertModel, _tiny_bert, _bert_run),
]


def _modules_of(subject):
    if isinstance(subject, tuple):
        return [m for part in subject for m in _modules_of(part)]
    if isinstance(subject, nn.Module):
        return [module for _, module in subject.named_modules()]
    return []


def _arrays(result):
    """The arrays of a result, in order (None kept as a marker)."""
    if isinstance(result, (tuple, list)):
        return [a for part in result for a in _arrays(part)]
    return [result]


def assert_bitwise_equal(actual, expected):
    actual, expected = _arrays(actual), _arrays(expected)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        if e is None:
            assert a is None
            continue
        assert a.dtype == e.dtype and a.shape == e.shape
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(e).tobytes()


def _state(subject):
    """Every array of the subject's modules and of a KV cache, copied."""
    arrays = [np.copy(v) for m in _modules_of(subject) for v in m.state_dict().values()]
    caches = [subject] if isinstance(subject, nn.KVCache) else \
        [s for s in subject if isinstance(s, nn.KVCache)] if isinstance(subject, tuple) else []
    for cache in caches:
        if cache._keys is not None:
            arrays += [np.copy(cache._keys[:, :, :len(cache)]), np.copy(cache._values[:, :, :len(cache)])]
    return arrays


@pytest.mark.parametrize("how", COPIERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_copy_computes_what_the_original_does(case, how):
    original = case.build()
    case.run(original)                  # a used module: caches filled, statistics and generators moved
    clone = COPIERS[how](original)
    assert type(clone) is type(original)
    assert_bitwise_equal(_state(clone), _state(original))
    for _ in range(2):                  # and they stay in step, call after call
        assert_bitwise_equal(case.run(clone), case.run(original))
    for module in _modules_of(clone):
        # the attribute users read and the registry state_dict reads are one
        # array, in the copy as in the original
        for name, value in module._parameters.items():
            assert getattr(module, name) is value
        for name, value in module._buffers.items():
            assert getattr(module, name) is value
        for name, child in module._modules.items():
            assert getattr(module, name) is child


@pytest.mark.parametrize("how", COPIERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_copy_is_independent_of_the_original(case, how):
    original, twin = case.build(), case.build()     # twin: what the original must keep computing
    case.run(original)
    case.run(twin)
    clone = COPIERS[how](original)
    for module in _modules_of(clone):
        for store in (module._parameters, module._buffers):
            for value in store.values():
                if value is not None:
                    value += 1                              # in place, as an optimiser step does
        for value in vars(module).values():
            if isinstance(value, np.random.Generator):
                value.random(7)
    for module, original_module in zip(_modules_of(clone), _modules_of(original)):
        for name, value in module.state_dict().items():
            assert not np.shares_memory(value, original_module.state_dict()[name]), name
    case.run(clone)                                         # grows the clone's cache, if it has one
    assert_bitwise_equal(_state(original), _state(twin))
    assert_bitwise_equal(case.run(original), case.run(twin))


def test_every_public_class_is_covered():
    covered = {case.cls for case in CASES}
    missing = [name for name in nn.__all__
               if inspect.isclass(getattr(nn, name)) and getattr(nn, name) not in covered]
    assert not missing, f"add cases to tests/test_pickle.py for: {', '.join(missing)}"


@pytest.mark.parametrize("how", COPIERS)
def test_gelu_tanh_keeps_the_fused_path_after_copying(how, monkeypatch):
    layer = nn.TransformerEncoderLayer(8, 2, 16, activation="gelu_tanh", batch_first=True,
                                       rng=seeded()).eval()
    clone = COPIERS[how](layer)
    assert clone.activation is nn.layers.gelu_tanh
    assert LINEAR_ACTIVATION_NAMES[clone.activation] == "gelu_tanh"
    asked = []
    linear = F.linear

    def spy(*args, **kwargs):
        asked.append(kwargs.get("activation"))
        return linear(*args, **kwargs)

    monkeypatch.setattr(F, "linear", spy)
    x = data(3, 5, 8)
    h = clone._feed_forward(x)
    assert asked[0] == "gelu_tanh"       # linear1 with its activation in one call, not GELU after
    expected = F.linear(F.linear(x, clone.linear1.weight, clone.linear1.bias, activation="gelu_tanh"),
                        clone.linear2.weight, clone.linear2.bias)
    assert_bitwise_equal(h, expected)
    assert_bitwise_equal(clone(x), layer(x))


def test_gelu_tanh_is_the_tanh_approximation_and_has_a_name():
    x = data(4, 9)
    assert_bitwise_equal(nn.layers.gelu_tanh(x), F.gelu(x, "tanh"))
    assert nn.get_activation("gelu_tanh") is nn.layers.gelu_tanh
    assert pickle.loads(pickle.dumps(nn.layers.gelu_tanh)) is nn.layers.gelu_tanh


def test_pickle_of_a_kv_cache_holds_only_the_cached_steps():
    cache = nn.KVCache()
    cache.append(data(1, 2, 3, 4), data(1, 2, 3, 4, seed=2))     # room for 16 steps is reserved
    restored = pickle.loads(pickle.dumps(cache))
    assert len(restored) == 3 and restored._keys.shape == (1, 2, 3, 4)
    assert len(pickle.dumps(cache)) < 2 * 2 * 3 * 4 * 4 + 1000
    keys, values = restored.append(data(1, 2, 1, 4, seed=3), data(1, 2, 1, 4, seed=4))
    assert keys.shape == values.shape == (1, 2, 4, 4)
    assert len(pickle.loads(pickle.dumps(nn.KVCache()))) == 0


# ---------------------------------------------------------------------------
# The pretrained sentence encoder (skips as tests/test_models.py does)


TEXTS = ["A man is eating food.", "Hi", "", "Ünïcödé text, and some punctuation!?"]
# tokenized only: running the model on 256 tokens is slow under the sanitizers
LONG = " ".join(["a long sentence that the tokenizer has to truncate"] * 60)


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder.from_pretrained(find_checkpoint())


@needs_checkpoint
@pytest.mark.parametrize("how", COPIERS)
def test_sentence_encoder_copies(encoder, how):
    # The tokenizer's padding and truncation settings travel with it: the long
    # text is truncated and the batch padded, as in the original.
    expected = encoder.encode(TEXTS, batch_size=2)
    clone = COPIERS[how](encoder)
    assert clone.tokenizer is not encoder.tokenizer and clone.model is not encoder.model
    assert clone.max_seq_length == 256 and clone.normalize
    long_ids, long_mask = clone.tokenize(TEXTS + [LONG])
    assert long_ids.shape == (len(TEXTS) + 1, 256) and long_mask[1].sum() == 3
    np.testing.assert_array_equal(long_ids, encoder.tokenize(TEXTS + [LONG])[0])
    ids, mask = clone.tokenize(TEXTS)
    assert_bitwise_equal(clone.encode(TEXTS, batch_size=2), expected)
    assert_bitwise_equal(clone.model(ids, attention_mask=mask), encoder.model(ids, attention_mask=mask))
    # independent: the clone's weights and tokenizer settings are its own
    clone.model.embeddings.word_embeddings.weight += 1
    clone.tokenizer.enable_truncation(max_length=8)
    assert clone.tokenize(TEXTS + [LONG])[0].shape == (len(TEXTS) + 1, 8)
    assert_bitwise_equal(encoder.encode(TEXTS, batch_size=2), expected)
    assert encoder.tokenize(TEXTS + [LONG])[0].shape == (len(TEXTS) + 1, 256)


@needs_checkpoint
def test_pretrained_bert_model_pickles(encoder):
    ids, mask = encoder.tokenize(TEXTS[:3])
    clone = pickle.loads(pickle.dumps(encoder.model, protocol=pickle.HIGHEST_PROTOCOL))
    assert clone.config == encoder.model.config and not clone.training
    assert_bitwise_equal(clone(ids, attention_mask=mask), encoder.model(ids, attention_mask=mask))
