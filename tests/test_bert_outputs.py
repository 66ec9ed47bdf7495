"""BertModel's output_attentions and output_hidden_states against Hugging
Face's BertModel (eager attention, the same weights, eval mode), the default
return left as it was, the weights' masking, the real MiniLM checkpoint, and
the training path's backward with the weights asked for."""

import numpy as np
import pytest

from attnkit.models import BertModel, BertOutput, SentenceEncoder, find_checkpoint
from accuracy import needs_checkpoint, torch_or_skip, transformers_or_skip
from test_bert_backward import inputs, tiny_config      # the same tiny BERT and padded batch

DTYPES = [np.float32, np.float64]
TOLERANCE = {np.float32: 1e-5, np.float64: 1e-10}   # relative to the compared arrays' scale


def tiny_model(dtype=np.float64, **overrides):
    model = BertModel(tiny_config(**overrides), dtype=dtype, rng=np.random.default_rng(1))
    for _, p in model.named_parameters():
        p += (0.05 * np.random.default_rng(2).standard_normal(p.shape)).astype(dtype)
    return model


def assert_close(actual, expected, dtype, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape and actual.dtype == np.dtype(dtype), what
    scale = max(float(np.abs(expected).max()), 1.0) if expected.size else 1.0
    worst = float(np.abs(actual.astype(np.float64) - expected).max()) if expected.size else 0.0
    assert worst <= TOLERANCE[dtype] * scale, f"{what}: {worst:.3g} > {TOLERANCE[dtype]} x {scale:.3g}"


@pytest.fixture(scope="module")
def hugging_face_pair():
    """For each dtype: our tiny model (eval) and Hugging Face's with its weights."""
    torch = torch_or_skip()
    transformers = transformers_or_skip()
    pairs = {}
    for dtype in DTYPES:
        ours = tiny_model(dtype).eval()
        hf_config = transformers.BertConfig(**vars(ours.config), attn_implementation="eager")
        theirs = transformers.BertModel(hf_config, add_pooling_layer=False)
        theirs = theirs.to(torch.float32 if dtype == np.float32 else torch.float64)
        state = {k: torch.from_numpy(np.array(v)) for k, v in ours.state_dict().items()}
        missing, unexpected = theirs.load_state_dict(state, strict=False)
        assert not unexpected and all("position_ids" in k for k in missing)
        pairs[dtype] = ours, theirs.eval()
    return torch, pairs


@pytest.mark.parametrize("dtype", DTYPES)
def test_hidden_states_and_attentions_match_hugging_face(hugging_face_pair, dtype):
    torch, pairs = hugging_face_pair
    ours, theirs = pairs[dtype]
    ids, mask, types = inputs()
    out = ours(ids, mask, types, output_attentions=True, output_hidden_states=True)
    with torch.no_grad():
        ref = theirs(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                     token_type_ids=torch.from_numpy(types), output_attentions=True,
                     output_hidden_states=True)
    layers = ours.config.num_hidden_layers
    assert isinstance(out, BertOutput)
    assert len(out.hidden_states) == len(ref.hidden_states) == layers + 1
    assert len(out.attentions) == len(ref.attentions) == layers
    # Every row is compared, padded queries' too: both models mask keys only
    # ((N, 1, 1, L) masks), so a padded query attends to the real tokens in
    # both, and its hidden state is the same (unused) number in both.
    for i, (a, e) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert_close(a, e.numpy(), dtype, f"hidden_states[{i}]")
    for i, (a, e) in enumerate(zip(out.attentions, ref.attentions)):
        assert a.shape == (3, 4, 7, 7)
        assert_close(a, e.numpy(), dtype, f"attentions[{i}]")
    assert_close(out.last_hidden_state, ref.last_hidden_state.numpy(), dtype, "last_hidden_state")
    assert out.last_hidden_state is out.hidden_states[-1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_return_is_unchanged(dtype):
    model = tiny_model(dtype).eval()
    ids, mask, types = inputs()
    plain = model(ids, mask, types)
    assert isinstance(plain, np.ndarray) and plain.shape == (3, 7, 16) and plain.dtype == dtype
    explicit = model(ids, mask, types, output_attentions=False, output_hidden_states=False)
    assert isinstance(explicit, np.ndarray)
    np.testing.assert_array_equal(plain, explicit)
    for attentions, hidden in [(True, False), (False, True), (True, True)]:
        out = model(ids, mask, types, output_attentions=attentions, output_hidden_states=hidden)
        np.testing.assert_array_equal(out.last_hidden_state, plain)
        assert (out.attentions is not None) == attentions
        assert (out.hidden_states is not None) == hidden
    with pytest.raises(TypeError):           # the flags are keyword-only
        model(ids, mask, types, True)


def test_attention_rows_sum_to_one_over_real_keys():
    model = tiny_model(np.float64).eval()
    ids, mask, types = inputs()
    attentions = model(ids, mask, types, output_attentions=True).attentions
    keep = mask.astype(bool)[:, None, None, :]                    # (N, 1, 1, L): keys
    for a in attentions:
        assert a.shape == (3, 4, 7, 7)
        assert (a >= 0).all()
        assert not np.where(keep, 0, a).any()                   # padded keys: exactly 0
        np.testing.assert_allclose(np.where(keep, a, 0).sum(-1), 1, rtol=0, atol=1e-12)
    # an empty batch or sequence still gives tuples of the right shapes
    for shape in [(0, 7), (3, 0)]:
        out = model(np.zeros(shape, np.int64), output_attentions=True, output_hidden_states=True)
        assert [a.shape for a in out.attentions] == [shape[:1] + (4,) + shape[1:] * 2] * 2
        assert [h.shape for h in out.hidden_states] == [shape + (16,)] * 3


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_training_backward_with_output_attentions(dropout):
    """The same forward (the generators reset) with and without the flags
    gives the same output and, from the gradient of last_hidden_state, the
    same parameter gradients; the weights are the ones before dropout."""
    model = tiny_model(np.float64, hidden_dropout_prob=dropout,
                       attention_probs_dropout_prob=dropout).train()
    ids, mask, types = inputs()
    generators = [m for _, m in model.named_modules() if hasattr(m, "rng")]
    states = [m.rng.bit_generator.state for m in generators]
    grad = np.random.default_rng(5).standard_normal((3, 7, 16))

    def run(**flags):
        for m, state in zip(generators, states):
            m.rng.bit_generator.state = state
        model.zero_grad()
        out = model(ids, mask, types, **flags)
        model.backward(grad)
        return out, {k: v.copy() for k, v in model.grads().items()}

    plain, grads = run()
    out, grads_flags = run(output_attentions=True, output_hidden_states=True)
    np.testing.assert_array_equal(out.last_hidden_state, plain)
    assert grads.keys() == grads_flags.keys()
    for name in grads:
        np.testing.assert_array_equal(grads_flags[name], grads[name], err_msg=name)
    assert any(g.any() for g in grads.values())
    evaluated = model.eval()(ids, mask, types, output_attentions=True)
    for a, e in zip(out.attentions, evaluated.attentions):
        if dropout == 0:
            np.testing.assert_allclose(a, e, rtol=0, atol=1e-12)
        else:   # training's weights differ (dropout elsewhere), but are softmax rows, before dropout
            keep = mask.astype(bool)[:, None, None, :]
            assert not np.where(keep, 0, a).any()
            np.testing.assert_allclose(a.sum(-1), 1, rtol=0, atol=1e-12)




@needs_checkpoint
def test_minilm_checkpoint_attentions_and_hidden_states():
    encoder = SentenceEncoder.from_pretrained(find_checkpoint())
    ids, mask = encoder.tokenize(["A man is eating food.", "Attention is all you need, they said."])
    out = encoder.model(ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    N, L = ids.shape
    assert len(out.attentions) == 6 and len(out.hidden_states) == 7
    assert all(a.shape == (N, 12, L, L) and a.dtype == np.float32 for a in out.attentions)
    assert all(h.shape == (N, L, 384) for h in out.hidden_states)
    keep = mask.astype(bool)[:, None, None, :]
    for a in out.attentions:
        assert not np.where(keep, 0, a).any()
        np.testing.assert_allclose(a.sum(-1), 1, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(out.last_hidden_state, encoder.model(ids, attention_mask=mask))
