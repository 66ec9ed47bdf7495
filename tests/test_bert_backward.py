"""BertModel's backward against Hugging Face's BertModel under
torch.autograd, with the same weights (dropout 0 on both sides), frozen
layers, dropout's replay, and the eval path left as it was."""
import numpy as np
import pytest

from attnkit.models import BertConfig, BertModel
from accuracy import torch_or_skip, transformers_or_skip
from gradients import assert_close

DTYPES = [np.float32, np.float64]


def tiny_config(**overrides):
    fields = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=24, max_position_embeddings=20, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
    fields.update(overrides)
    return BertConfig(**fields)


def hugging_face(torch, config, dtype):
    transformers = transformers_or_skip()
    hf_config = transformers.BertConfig(**vars(config), attn_implementation="eager")
    model = transformers.BertModel(hf_config, add_pooling_layer=False)
    return model.to(torch.float32 if dtype == np.float32 else torch.float64)


def inputs(N=3, L=7, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 50, (N, L))
    mask = np.ones((N, L), np.int64)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = 0
    types = (np.arange(L) >= 3).astype(np.int64)[None].repeat(N, 0)
    return ids, mask, types


def run_both(torch, config, dtype, frozen=()):
    ours = BertModel(config, dtype=dtype, rng=np.random.default_rng(1)).train()
    for _, p in ours.named_parameters():
        p += (0.05 * np.random.default_rng(2).standard_normal(p.shape)).astype(dtype)
    theirs = hugging_face(torch, config, dtype)
    state = {k: torch.from_numpy(np.array(v)) for k, v in ours.state_dict().items()}
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    theirs.train()
    if frozen:
        ours.freeze(*frozen)
        for name, p in theirs.named_parameters():
            p.requires_grad_(not any(name == f or name.startswith(f + ".") for f in frozen))
    ids, mask, types = inputs()
    out = ours(ids, mask, types)
    out_t = theirs(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                   token_type_ids=torch.from_numpy(types)).last_hidden_state
    grad = np.random.default_rng(3).standard_normal(out.shape).astype(dtype)
    grad[mask == 0] = 0               # padded positions' outputs are not used
    assert ours.backward(grad) is None
    out_t.backward(torch.from_numpy(grad))
    keep = mask.astype(bool)
    assert_close(out[keep], out_t.detach().numpy()[keep], dtype, "output")
    return ours, theirs


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_bert_gradients_match_hugging_face(dtype, act):
    torch = torch_or_skip()
    ours, theirs = run_both(torch, tiny_config(hidden_act=act), dtype)
    theirs_params = dict(theirs.named_parameters())
    grads = ours.grads()
    assert list(grads) == [n for n, _ in ours.named_parameters()]
    for name, g in grads.items():
        # a key bias adds one number to a whole row of scores, which softmax
        # ignores: its gradient is 0 but for rounding, on the key weight's scale
        floor = (np.abs(grads[name.replace("bias", "weight")]).max()
                 if name.endswith("key.bias") else 0.0)
        assert_close(g, theirs_params[name].grad.numpy(), dtype, name, floor)


def test_frozen_lower_layers_are_not_differentiated():
    torch = torch_or_skip()
    frozen = ("embeddings", "encoder.layer.0")
    ours, theirs = run_both(torch, tiny_config(), np.float64, frozen=frozen)
    theirs_params = dict(theirs.named_parameters())
    for name, g in ours.grads().items():
        if name.startswith(frozen):
            assert not g.any(), name
        else:
            floor = 1e-6 if name.endswith("key.bias") else 0.0
            assert_close(g, theirs_params[name].grad.numpy(), np.float64, name, floor)
    # the frozen layer's backward never ran: its children hold no gradient arrays
    assert all(not m._grads for _, m in ours.encoder.layer[0].named_modules())


def test_dropout_is_replayed_by_backward():
    """With dropout on, the gradient is the derivative of the function the
    forward computed: a float64 directional finite difference, the model's
    random generators reset to the same state before every forward."""
    model = BertModel(tiny_config(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.3),
                      dtype=np.float64, rng=np.random.default_rng(4)).train()
    ids, mask, types = inputs()
    generators = [m for _, m in model.named_modules() if hasattr(m, "rng")]
    states = [m.rng.bit_generator.state for m in generators]

    def forward():
        for m, state in zip(generators, states):
            m.rng.bit_generator.state = state
        return model(ids, mask, types)

    out = forward()
    grad = np.random.default_rng(5).standard_normal(out.shape)
    model.zero_grad()
    model.backward(grad)
    name = "encoder.layer.0.attention.self.query.weight"
    weight = dict(model.named_parameters())[name]
    direction = np.random.default_rng(6).standard_normal(weight.shape)
    h = 1e-6
    weight += h * direction
    up = np.sum(forward() * grad)
    weight -= 2 * h * direction
    down = np.sum(forward() * grad)
    weight += h * direction
    numeric = (up - down) / (2 * h)
    analytic = np.sum(model.grads()[name] * direction)
    assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic))


def test_eval_after_training_is_the_fused_path():
    model = BertModel(tiny_config(), dtype=np.float64, rng=np.random.default_rng(7))
    ids, mask, types = inputs()
    trained = model.train()(ids, mask, types)
    evaluated = model.eval()(ids, mask, types)
    np.testing.assert_allclose(trained, evaluated, rtol=1e-12, atol=1e-12)
    assert all(m._saved is None for _, m in model.named_modules())
