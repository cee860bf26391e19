"""BayesFakeDetector: the public inference contract, seeded sampling, cheap sampling, grouped-conv batching, init."""

import math

import pytest
import torch
import torch.nn.functional as F
from bayesian_torch.layers import Conv2dFlipout, Conv2dReparameterization, LinearFlipout, LinearReparameterization

from hub_models.configuration_bayesfake import BayesFakeConfig
import hub_models.modeling_bayesfake as mb
from hub_models.modeling_bayesfake import BayesFakeDetector, apply_layer, gaussian_kl

# (head, variational_scope, variational_layer): every kind of head the config allows on the scratch CNN.
HEADS = [
    ("deterministic", "head", "reparameterization"),
    ("mc_dropout", "head", "reparameterization"),
    ("variational", "head", "reparameterization"),
    ("variational", "head", "flipout"),
    ("variational", "all", "reparameterization"),
    ("variational", "all", "flipout"),
]
HEAD_IDS = ["-".join(h) for h in HEADS]
STOCHASTIC_HEADS = [h for h in HEADS if h[0] != "deterministic"]
STOCHASTIC_IDS = ["-".join(h) for h in STOCHASTIC_HEADS]
B, T = 3, 5


pytestmark = pytest.mark.usefixtures("one_thread")


def build(head, scope="head", layer="reparameterization", seed=0, **overrides):
    kwargs = dict(cnn_widths=[4, 8, 8], head_hidden=[8], num_samples=8, image_size=16)
    kwargs.update(overrides)
    config = BayesFakeConfig(head=head, variational_scope=scope, variational_layer=layer, **kwargs)
    torch.manual_seed(seed)
    return BayesFakeDetector(config).eval()


def images(b=B, seed=1, size=16):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def plain_probs(model, x):
    """The plain eval forward, by hand: backbone once, head with mean weights and no dropout."""
    with torch.no_grad():
        return torch.softmax(model.head(model.backbone(x), 1, False), dim=-1)


def entropy(p):
    return -(p * p.log()).sum(-1)


# ----------------------------------------------------------------------------------------------------------------------
# The inference contract


@pytest.mark.parametrize("kind", HEADS, ids=HEAD_IDS)
def test_output_contract(kind):
    model = build(*kind)
    with torch.no_grad():
        out = model(images(), num_samples=T, seed=0)
    assert out.probs.shape == (B, 2)
    assert out.sample_probs.shape == (T, B, 2)
    assert out.std.shape == (B, 2)
    for name in ("predictive_entropy", "mutual_information", "expected_entropy"):
        assert getattr(out, name).shape == (B,), name
    assert out.logits.shape == (B, 2)
    assert torch.allclose(out.probs.sum(-1), torch.ones(B), atol=1e-6)
    assert torch.allclose(out.sample_probs.sum(-1), torch.ones(T, B), atol=1e-6)
    assert torch.allclose(out.probs, out.sample_probs.mean(0), atol=1e-7)
    assert torch.allclose(out.std, out.sample_probs.std(0, unbiased=False), atol=1e-7)
    assert torch.allclose(out.predictive_entropy, entropy(out.probs), atol=1e-6)
    assert torch.allclose(out.expected_entropy, entropy(out.sample_probs).mean(0), atol=1e-6)
    assert torch.allclose(out.predictive_entropy, out.mutual_information + out.expected_entropy, atol=1e-5)
    assert (out.mutual_information >= 0).all()
    assert torch.allclose(out.logits, out.probs.log(), atol=1e-6)
    assert out.loss is None and out.kl is None  # eval mode without labels: no loss, no KL work
    # The default T is the config's.
    with torch.no_grad():
        assert model(images()).sample_probs.shape == (8, B, 2)


@pytest.mark.parametrize("kind", STOCHASTIC_HEADS, ids=STOCHASTIC_IDS)
def test_stochastic_heads_give_distinct_samples(kind):
    model = build(*kind)
    with torch.no_grad():
        out = model(images(), num_samples=T, seed=0)
    sp = out.sample_probs
    for i in range(T):
        for j in range(i + 1, T):
            assert not torch.equal(sp[i], sp[j]), (i, j)
    assert (out.std > 0).all()
    assert (out.mutual_information > 0).all()


def test_deterministic_head_single_sample_equals_plain_forward():
    model = build("deterministic")
    x = images()
    with torch.no_grad():
        one = model(x, num_samples=1)
        many = model(x, num_samples=T)
    expected = plain_probs(model, x)
    assert torch.allclose(one.probs, expected, atol=1e-6)
    assert torch.allclose(many.probs, expected, atol=1e-6)
    assert torch.equal(many.std, torch.zeros(B, 2))
    assert torch.allclose(many.mutual_information, torch.zeros(B), atol=1e-6)


@pytest.mark.parametrize("kind", HEADS, ids=HEAD_IDS)
def test_stochastic_false_is_the_plain_forward(kind):
    model = build(*kind)
    x = images()
    expected = plain_probs(model, x)
    with torch.no_grad():
        out = model(x, num_samples=T, stochastic=False)
        again = model(x, num_samples=T, stochastic=False)
    assert out.sample_probs.shape == (T, B, 2)
    assert torch.allclose(out.probs, expected, atol=1e-6)
    assert torch.equal(out.probs, again.probs)
    assert torch.equal(out.std, torch.zeros(B, 2))


def test_temperature_scales_every_sample():
    model = build("mc_dropout")
    hot = build("mc_dropout", calibration_temperature=2.0)
    hot.load_state_dict(model.state_dict())
    x = images()
    with torch.no_grad():
        logits = model.sample_logits(x, 1, stochastic=False)[0]
        out = hot(x, num_samples=1, stochastic=False)
    assert torch.allclose(out.probs, torch.softmax(logits / 2.0, -1), atol=1e-6)


def test_bad_inputs_raise():
    model = build("mc_dropout")
    with pytest.raises(ValueError, match="pixel_values"):
        model(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="pixel_values"):
        model(torch.randn(2, 1, 16, 16))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_samples"):
            model(images(), num_samples=bad)
    with pytest.raises(ValueError, match="uint8 images must go through the image processor"):
        model(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="must be 16x16 .* got 32x32"):
        model(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="empty batch"):
        model(torch.zeros(0, 3, 16, 16))
    with pytest.raises(ValueError, match="empty batch|non-empty"):
        model.forward_features(torch.zeros(0, model.backbone.num_features))


def test_misspelt_keyword_is_a_type_error_naming_it():
    model = build("mc_dropout")
    with pytest.raises(TypeError, match="num_sample"):
        model(images(), num_sample=10)
    with pytest.raises(TypeError, match="sed"):
        model(images(), sed=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("kind", HEADS, ids=HEAD_IDS)
def test_nan_or_inf_input_is_an_error_never_a_verdict(kind, bad):
    model = build(*kind)
    x = images()
    x[1, 0, 3, 3] = bad
    with torch.no_grad(), pytest.raises(ValueError, match="pixel_values holds 1 NaN or infinite"):
        model(x, num_samples=T)
    if not model.backbone_stochastic:
        features = model.backbone(images())
        features[0, 0] = bad
        with torch.no_grad(), pytest.raises(ValueError, match="features holds 1 NaN"):
            model.forward_features(features, num_samples=T)


@pytest.mark.parametrize("kind", HEADS, ids=HEAD_IDS)
def test_nan_weights_are_an_error_never_a_verdict(kind):
    model = build(*kind)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.startswith("head.")).fill_(math.nan)
        with pytest.raises(ValueError, match="detector's output .* NaN"):
            model(images(), num_samples=T)


def test_verdicts_refuse_nan():
    model = build("mc_dropout")
    with torch.no_grad():
        out = model(images(), num_samples=T, seed=0)
    assert len(model.verdicts(out)) == B
    out.probs[0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        model.verdicts(out)


@pytest.mark.parametrize("kind", STOCHASTIC_HEADS, ids=STOCHASTIC_IDS)
def test_an_image_gets_the_same_answer_in_any_batch(kind):
    """A given image, seed and T give the same answer alone, first or last in a batch, whatever the batch size."""
    model = build(*kind)
    x = images(b=5)
    with torch.no_grad():
        whole = model(x, num_samples=T, seed=3)
        for i in range(5):
            alone = model(x[i : i + 1], num_samples=T, seed=3)
            torch.testing.assert_close(alone.sample_probs[:, 0], whole.sample_probs[:, i], atol=1e-6, rtol=0)
        reordered = model(x.flip(0)[:3], num_samples=T, seed=3)
    torch.testing.assert_close(reordered.probs, whole.probs.flip(0)[:3], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Seeded sampling


@pytest.mark.parametrize("kind", STOCHASTIC_HEADS, ids=STOCHASTIC_IDS)
def test_seeded_sampling_repeats_and_seeds_differ(kind):
    model = build(*kind)
    x = images()
    with torch.no_grad():
        a = model(x, num_samples=T, seed=7).sample_probs
        b = model(x, num_samples=T, seed=7).sample_probs
        c = model(x, num_samples=T, seed=8).sample_probs
        g1 = model(x, num_samples=T, generator=torch.Generator().manual_seed(3)).sample_probs
        g2 = model(x, num_samples=T, generator=torch.Generator().manual_seed(3)).sample_probs
        g3 = model(x, num_samples=T, generator=torch.Generator().manual_seed(4)).sample_probs
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(g1, g2)
    assert not torch.equal(g1, g3)


@pytest.mark.parametrize("kind", STOCHASTIC_HEADS, ids=STOCHASTIC_IDS)
def test_seeded_call_leaves_global_rng_untouched(kind):
    model = build(*kind)
    x = images()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with torch.no_grad():
        model(x, num_samples=T, seed=5)
        model(x, num_samples=T, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    # A call without seed or generator samples with config.sampling_seed: repeatable, global RNG untouched.
    with torch.no_grad():
        d1 = model(x, num_samples=T).sample_probs
        d2 = model(x, num_samples=T).sample_probs
        seeded = model(x, num_samples=T, seed=model.config.sampling_seed).sample_probs
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(d1, d2) and torch.equal(d1, seeded)
    # sampling_seed=None: unseeded calls draw from the global RNG (and so differ from call to call).
    model.config.sampling_seed = None
    with torch.no_grad():
        u1 = model(x, num_samples=T).sample_probs
        u2 = model(x, num_samples=T).sample_probs
    assert not torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(u1, u2)


def test_generator_is_advanced_not_global():
    model = build("mc_dropout")
    x = images()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        first = model(x, num_samples=T, generator=gen).sample_probs
        second = model(x, num_samples=T, generator=gen).sample_probs
    assert not torch.equal(first, second)  # a generator is a stream: the next call draws fresh samples


# ----------------------------------------------------------------------------------------------------------------------
# MC dropout keeps BatchNorm in eval; sampling is cheap


def test_mc_dropout_keeps_batchnorm_in_eval():
    model = build("mc_dropout")
    # Give the running statistics non-trivial values, as after training.
    for norm in model.backbone.norms:
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 1.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        out = model(images(b=4), num_samples=T, seed=0)
    assert not model.training
    assert not any(m.training for m in model.modules())
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    sp = out.sample_probs
    assert not torch.equal(sp[0], sp[1])
    assert (out.std > 0).all()


@pytest.mark.parametrize("kind", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("t", [1, 30])
def test_backbone_runs_once_per_image_for_head_only_models(kind, t):
    model = build(*kind)
    rows = []
    handle = model.backbone.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            out = model(images(b=4), num_samples=t, seed=0)
    finally:
        handle.remove()
    assert out.sample_probs.shape == (t, 4, 2)
    assert len(rows) == 1  # one backbone call, never a Python loop over samples
    if kind[1] == "all" and kind[0] == "variational":
        assert rows == [4 * t]  # every layer is stochastic: the T weight samples are batched in one call
    else:
        assert rows == [4]  # the backbone sees B rows, not T*B


# ----------------------------------------------------------------------------------------------------------------------
# Variational layers batched over T samples


def _conv_layer(cls, bias, seed=0):
    torch.manual_seed(seed)
    layer = cls(3, 4, 3, padding=1, bias=bias, posterior_rho_init=-2.0)
    layer.mu_kernel.data.normal_()
    return layer.eval()


@pytest.mark.parametrize("cls", [Conv2dReparameterization, Conv2dFlipout])
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_conv_equals_separate_convs(cls, bias):
    """At inference both layer families draw T independent weights and apply them as one grouped conv."""
    layer = _conv_layer(cls, bias)
    t, b = 4, 2
    x = torch.randn(b * t, 3, 6, 6)
    torch.manual_seed(11)
    out = apply_layer(layer, x, t, stochastic=True)
    # Replay the same draws: T weight tensors then (if any) T bias vectors, in apply_layer's order.
    torch.manual_seed(11)
    sigma_w = F.softplus(layer.rho_kernel)
    weights = layer.mu_kernel + sigma_w * torch.randn((t, *layer.mu_kernel.shape))
    biases = [None] * t
    if bias:
        biases = layer.mu_bias + F.softplus(layer.rho_bias) * torch.randn((t, *layer.mu_bias.shape))
    xs = x.reshape(b, t, 3, 6, 6)  # image-major: row i*T + s is image i, sample s
    expected = torch.stack(
        [torch.stack([F.conv2d(xs[i, s : s + 1], weights[s], biases[s], padding=1)[0] for s in range(t)])
         for i in range(b)]
    ).reshape(b * t, 4, 6, 6)
    assert out.shape == (b * t, 4, 6, 6)
    assert torch.allclose(out, expected, atol=1e-5)
    # The T samples are distinct weights: the same image gives T different outputs.
    same = x.reshape(b, t, 3, 6, 6)[:, :1].expand(b, t, 3, 6, 6).reshape(b * t, 3, 6, 6)
    outs = apply_layer(layer, same, t, stochastic=True).reshape(b, t, -1)
    for s in range(1, t):
        assert not torch.allclose(outs[:, 0], outs[:, s])


@pytest.mark.parametrize("cls", [LinearReparameterization, LinearFlipout])
def test_batched_linear_equals_separate_matmuls(cls):
    torch.manual_seed(0)
    layer = cls(5, 3, posterior_rho_init=-2.0).eval()
    t, b = 4, 2
    x = torch.randn(b * t, 5)
    torch.manual_seed(3)
    out = apply_layer(layer, x, t, stochastic=True)
    torch.manual_seed(3)
    weights = layer.mu_weight + F.softplus(layer.rho_weight) * torch.randn((t, 3, 5))
    biases = layer.mu_bias + F.softplus(layer.rho_bias) * torch.randn((t, 3))
    xs = x.reshape(b, t, 5)
    expected = torch.stack([torch.stack([F.linear(xs[i, s], weights[s], biases[s]) for s in range(t)])
                            for i in range(b)]).reshape(b * t, 3)
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("cls", [Conv2dReparameterization, Conv2dFlipout])
def test_variational_conv_mean_weights_when_not_stochastic(cls):
    layer = _conv_layer(cls, bias=True)
    x = torch.randn(6, 3, 5, 5)
    expected = F.conv2d(x, layer.mu_kernel, layer.mu_bias, padding=1)
    assert torch.allclose(apply_layer(layer, x, 3, stochastic=False), expected, atol=1e-6)


def test_flipout_in_training_uses_bayesian_torch_forward():
    """Training keeps flipout's per-example sign flips (decorrelated gradients), i.e. bayesian-torch's own forward."""
    layer = _conv_layer(Conv2dFlipout, bias=True).train()
    x = torch.randn(6, 3, 5, 5)
    torch.manual_seed(4)
    out = apply_layer(layer, x, 3, stochastic=True)
    torch.manual_seed(4)
    expected = layer(x, return_kl=False)
    assert torch.equal(out, expected)


def test_flipout_samples_are_distinct_and_centred():
    layer = _conv_layer(Conv2dFlipout, bias=False).train()
    t = 64
    x = torch.randn(1, 3, 5, 5).expand(t, 3, 5, 5).contiguous()
    torch.manual_seed(0)
    with torch.no_grad():
        out = apply_layer(layer, x, t, stochastic=True)
    mean_out = F.conv2d(x[:1], layer.mu_kernel, None, padding=1)
    for s in range(1, t):
        assert not torch.allclose(out[0], out[s])
    # Flipout perturbations are zero-mean around the posterior-mean output.
    spread = (out - mean_out).std()
    assert (out.mean(0) - mean_out[0]).abs().mean() < 0.5 * spread


@pytest.mark.parametrize("layer", ["reparameterization", "flipout"])
def test_scope_all_samples_are_distinct_for_one_image(layer):
    model = build("variational", "all", layer)
    x = images(b=1)
    with torch.no_grad():
        features = model.backbone(x.expand(T, 3, 16, 16).contiguous(), T, True)
    for s in range(1, T):
        assert not torch.allclose(features[0], features[s])


# ----------------------------------------------------------------------------------------------------------------------
# Training-side outputs: loss and KL


@pytest.mark.parametrize("kind", HEADS, ids=HEAD_IDS)
def test_labels_give_nll_loss_and_kl(kind):
    model = build(*kind)
    x, labels = images(), torch.tensor([0, 1, 1])
    with torch.no_grad():
        out = model(x, num_samples=T, labels=labels, seed=0)
    expected = -out.probs[torch.arange(B), labels].log().mean()
    assert torch.allclose(out.loss, expected, atol=1e-6)
    if kind[0] == "variational":
        assert out.kl is not None and out.kl.item() > 0
        assert torch.allclose(out.kl, model.kl_divergence())
        assert torch.allclose(out.kl, sum(gaussian_kl(layer) for layer in model.bayesian_layers()))
    else:
        assert out.kl is None
        assert model.kl_divergence().item() == 0


def test_gaussian_kl_matches_closed_form():
    layer = LinearReparameterization(4, 2, prior_mean=0.1, prior_variance=0.5, posterior_rho_init=-3.0)
    sigma = F.softplus(layer.rho_weight)
    kl_w = (math.log(0.5) - sigma.log() + (sigma**2 + (layer.mu_weight - 0.1) ** 2) / (2 * 0.25) - 0.5).sum()
    sigma_b = F.softplus(layer.rho_bias)
    kl_b = (math.log(0.5) - sigma_b.log() + (sigma_b**2 + (layer.mu_bias - 0.1) ** 2) / (2 * 0.25) - 0.5).sum()
    assert torch.allclose(gaussian_kl(layer), kl_w + kl_b, rtol=1e-5)


def test_training_step_backpropagates_into_posterior():
    model = build("variational", "all", "reparameterization").train()
    out = model(images(), num_samples=2, labels=torch.tensor([0, 1, 0]), seed=0)
    assert out.kl is not None  # KL comes with every training forward
    (out.loss + out.kl / 1000).backward()
    conv = model.backbone.convs[0]
    assert conv.mu_kernel.grad is not None and conv.mu_kernel.grad.abs().sum() > 0
    assert conv.rho_kernel.grad is not None and conv.rho_kernel.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------------
# Initialisation


def test_post_init_uses_he_init_not_normal_002():
    config = BayesFakeConfig(head="deterministic")  # realistic widths: enough weights for a tight std estimate
    model = BayesFakeDetector(config)
    for conv in model.backbone.convs:
        he = math.sqrt(2.0 / (conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]))  # fan_out
        assert conv.weight.std().item() == pytest.approx(he, rel=0.2), conv
        assert conv.weight.std().item() > 0.03  # never the default normal(0.02)
    for norm in model.backbone.norms:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.running_var, torch.ones_like(norm.running_var))


def test_post_init_variational_layers():
    model = BayesFakeDetector(BayesFakeConfig(head="variational", variational_scope="all", prior_mu=0.1,
                                              prior_sigma=0.5, posterior_rho_init=-3.0))
    for conv in model.backbone.convs:
        fan_in = conv.mu_kernel[0].numel()
        assert conv.mu_kernel.std().item() == pytest.approx(math.sqrt(2.0 / fan_in), rel=0.2)
        assert conv.rho_kernel.mean().item() == pytest.approx(-3.0, abs=0.05)
    for layer in model.bayesian_layers():
        assert torch.equal(layer.prior_weight_mu, torch.full_like(layer.prior_weight_mu, 0.1))
        assert torch.equal(layer.prior_weight_sigma, torch.full_like(layer.prior_weight_sigma, 0.5))


# ----------------------------------------------------------------------------------------------------------------------
# Fast eval paths (folded BatchNorm, channels-last, T-pass loop) and adaptive sampling


def _reference_logits(model, x, t, seed):
    """The pre-speed-up computation, by hand: every layer through apply_layer (grouped convs over the T samples),
    eval BatchNorm as its own op, the head on features copied T times; the same RNG draws in the same order."""
    import hub_models.modeling_bayesfake as mb

    b = x.shape[0]
    sampled_backbone = model.backbone_stochastic
    with torch.no_grad(), mb.sampling_rng(seed, None, x.device):
        h = x.unsqueeze(1).expand(b, t, *x.shape[1:]).reshape(b * t, *x.shape[1:]) if sampled_backbone else x
        for i, (conv, norm) in enumerate(zip(model.backbone.convs, model.backbone.norms)):
            h = F.relu(norm(apply_layer(conv, h, t if sampled_backbone else 1, sampled_backbone)))
            if i in (1, 3):
                h = F.max_pool2d(h, 2)
        features = h.mean(dim=(2, 3))
        if not sampled_backbone:
            features = features.unsqueeze(1).expand(b, t, features.shape[-1]).reshape(b * t, -1)
        logits = model.head(features, t, True)
    return logits.reshape(b, t, -1).transpose(0, 1)


@pytest.mark.parametrize("kind", STOCHASTIC_HEADS, ids=STOCHASTIC_IDS)
def test_fast_eval_path_gives_the_plain_layers_samples(kind):
    """Folded BatchNorm, channels-last activations, the T-pass loop of an all-layer VI model and the head on shared
    features change only float round-off: the same samples as the plain layer-by-layer computation, same seed."""
    model = build(*kind)
    x = images(b=4)
    with torch.no_grad():
        out = model(x, num_samples=T, seed=11)
    expected = torch.softmax(_reference_logits(model, x, T, 11), dim=-1)
    torch.testing.assert_close(out.sample_probs, expected, atol=1e-5, rtol=0)


def test_fold_batchnorm_matches_conv_then_norm():
    from hub_models.modeling_bayesfake import fold_batchnorm

    torch.manual_seed(0)
    norm = torch.nn.BatchNorm2d(5).eval()
    norm.running_mean.normal_()
    norm.running_var.uniform_(0.5, 2.0)
    norm.weight.data.normal_()
    norm.bias.data.normal_()
    weight, bias, x = torch.randn(5, 3, 3, 3), torch.randn(5), torch.randn(2, 3, 8, 8)
    w, b = fold_batchnorm(weight, bias, norm)
    with torch.no_grad():
        torch.testing.assert_close(F.conv2d(x, w, b, padding=1), norm(F.conv2d(x, weight, bias, padding=1)),
                                   atol=1e-5, rtol=1e-5)


def test_default_output_has_no_adaptive_field():
    model = build("variational", "all")
    with torch.no_grad():
        out = model(images(), num_samples=T, seed=0)
    assert out.num_samples_used is None and "num_samples_used" not in out.keys()


@pytest.fixture
def never_settle(monkeypatch):
    """Adaptive sampling whose rule never stops early: it must then give the fixed-T answer exactly."""
    import hub_models.modeling_bayesfake as mb

    monkeypatch.setattr(mb, "ADAPTIVE_Z", 1e9)


@pytest.mark.parametrize("kind", STOCHASTIC_HEADS, ids=STOCHASTIC_IDS)
def test_adaptive_that_uses_every_sample_is_the_fixed_answer(kind, never_settle):
    model = build(*kind)
    x = images(b=4)
    with torch.no_grad():
        fixed = model(x, num_samples=12, seed=4)
        adaptive = model(x, num_samples=12, seed=4, adaptive=True)
    assert adaptive.num_samples_used.tolist() == [12] * 4
    for name in ("probs", "sample_probs", "std", "predictive_entropy", "mutual_information", "expected_entropy"):
        torch.testing.assert_close(getattr(adaptive, name), getattr(fixed, name), atol=1e-6, rtol=0, msg=name)
    assert model.verdicts(adaptive) == model.verdicts(fixed)


@pytest.mark.parametrize("kind", [("mc_dropout", "head", "reparameterization"),
                                  ("variational", "all", "reparameterization"), ("variational", "all", "flipout")],
                         ids=["mc_dropout", "all-reparameterization", "all-flipout"])
def test_adaptive_stops_settled_images_early_with_a_prefix_of_the_fixed_samples(kind):
    import hub_models.modeling_bayesfake as mb

    model = build(*kind, threshold=0.5)
    last = model.head.layers[-1]
    with torch.no_grad():  # sharper logits: some images far from the threshold (they settle), some near it
        (last.mu_weight if hasattr(last, "mu_weight") else last.weight).mul_(40.0)
    x = images(b=6) * torch.tensor([0.0, 0.5, 1.0, 2.0, 4.0, 8.0]).view(6, 1, 1, 1)
    t = 20
    with torch.no_grad():
        fixed = model(x, num_samples=t, seed=2)
        out = model(x, num_samples=t, seed=2, adaptive=True)
    used = out.num_samples_used
    assert used.shape == (6,) and used.dtype == torch.long
    assert ((used >= mb.ADAPTIVE_FIRST) & (used <= t)).all()
    assert used.min() < t and used.max() > mb.ADAPTIVE_FIRST  # some stopped early, some needed more samples
    for i, n in enumerate(used.tolist()):
        # The first n samples are the fixed call's; the rest were never drawn (NaN), and the statistics are theirs.
        torch.testing.assert_close(out.sample_probs[:n, i], fixed.sample_probs[:n, i], atol=1e-6, rtol=0)
        assert torch.isnan(out.sample_probs[n:, i]).all()
        torch.testing.assert_close(out.probs[i], fixed.sample_probs[:n, i].mean(0), atol=1e-6, rtol=0)
        torch.testing.assert_close(out.std[i], fixed.sample_probs[:n, i].std(0, unbiased=False), atol=1e-6, rtol=0)
    assert torch.allclose(out.predictive_entropy, out.mutual_information + out.expected_entropy, atol=1e-5)
    # Batch-independent, like the fixed call: each image alone stops where it stopped in the batch.
    with torch.no_grad():
        alone = [model(x[i:i + 1], num_samples=t, seed=2, adaptive=True) for i in (0, 5)]
    assert [a.num_samples_used.item() for a in alone] == [used[0].item(), used[5].item()]
    torch.testing.assert_close(torch.cat([a.probs for a in alone]), out.probs[[0, 5]], atol=1e-6, rtol=0)


def test_adaptive_rule_stops_far_from_every_cut_point_and_goes_on_near_one():
    model = build("variational", "all", threshold=0.5, reject_entropy=0.5)
    cuts = model.verdict_cut_points()
    # H(p) = 0.5 nats at p ~ 0.199 and 0.801; the threshold 0.5 lies inside the "uncertain" band, so it is no cut.
    assert len(cuts) == 2 and cuts[0] == pytest.approx(1 - cuts[1]) and 0.19 < cuts[0] < 0.21
    far = torch.full((3, 1), 0.02)          # agrees, far from both cuts
    near = torch.full((3, 1), cuts[1] + 0.01)  # agrees, just past a cut: more samples could move the mean across
    spread = torch.tensor([[0.05], [0.6], [0.95]])  # far on average, but the samples disagree
    settled = model.adaptive_settled(torch.cat([far, near, spread], 1), t=30)
    assert settled.tolist() == [True, False, False]
    assert model.adaptive_settled(torch.cat([far, near, spread], 1), t=3).all()  # n = T: always settled
    assert build("mc_dropout", threshold=0.3).verdict_cut_points() == [pytest.approx(0.3)]


def test_adaptive_is_refused_in_training_and_plain_for_deterministic_heads():
    model = build("variational", "all").train()
    with pytest.raises(ValueError, match="eval"):
        model(images(), num_samples=4, adaptive=True)
    det = build("deterministic")
    with torch.no_grad():
        out = det(images(), num_samples=T, adaptive=True)
    assert out.num_samples_used.tolist() == [T] * B
    torch.testing.assert_close(out.probs, plain_probs(det, images()), atol=1e-6, rtol=0)


def test_int8_backbone_is_opt_in_close_and_reversible():
    model = build("mc_dropout", cnn_widths=[8, 16, 16])
    x = images(b=32, seed=5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x, num_samples=T, seed=1)
        model.quantize_int8(x)
        assert model.is_quantized and model.config.int8_backbone
        quantized = model(x, num_samples=T, seed=1)
        explained = model.explain(x[:2], num_samples=T, seed=1)["output"]  # explain needs gradients: float weights
    assert (quantized.probs - before.probs).abs().max() < 0.1
    assert not torch.equal(quantized.probs, before.probs)
    torch.testing.assert_close(explained.probs, before.probs[:2], atol=1e-5, rtol=0)
    # The float weights are untouched; the calibrated observers are added as weights (saved with the model).
    added = set(model.state_dict()) - set(state)
    assert added and all(k.startswith("backbone.int8_observers.") for k in added)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    model.dequantize()
    assert not model.config.int8_backbone and model.state_dict().keys() == state.keys()
    with torch.no_grad():
        torch.testing.assert_close(model(x, num_samples=T, seed=1).probs, before.probs, atol=0, rtol=0)
    with pytest.raises(ValueError, match="only the from-scratch CNN"):
        build("variational", "all").quantize_int8(x)


def test_int8_release_round_trips_to_the_same_outputs(tmp_path):
    """An int8 detector saved and loaded again rebuilds the very same int8 network (stored observers, not a new
    calibration): identical outputs, through AutoModel as a user loads it."""
    from transformers import AutoModel

    model = build("mc_dropout", cnn_widths=[8, 16, 16])
    x = images(b=32, seed=5)
    with torch.no_grad():
        model.quantize_int8(images(b=64, seed=9))
        expected = model(x, num_samples=T, seed=1).probs
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert loaded.config.int8_backbone and loaded.is_quantized
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, num_samples=T, seed=1).probs, expected, atol=0, rtol=0)
    # Built from the config and given the weights later (no from_pretrained): the first forward builds it.
    rebuilt = BayesFakeDetector(loaded.config).eval()
    rebuilt.load_state_dict(loaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, num_samples=T, seed=1).probs, expected, atol=0, rtol=0)


def test_int8_config_without_calibration_is_an_error_not_a_float_model():
    model = build("mc_dropout", cnn_widths=[8, 16, 16], int8_backbone=True)
    with pytest.raises(ValueError, match="not calibrated"):
        model(images(), num_samples=T)
    with pytest.raises(ValueError, match="int8_backbone"):
        BayesFakeConfig(backbone="tf_efficientnet_lite0", int8_backbone=True)
    with pytest.raises(ValueError, match="int8_backbone"):
        BayesFakeConfig(head="variational", variational_scope="all", int8_backbone=True)


# ----------------------------------------------------------------------------------------------------------------------
# The reject score: predictive entropy, or the verdict entropy (P(FAKE) re-centred on the threshold)


def test_verdict_entropy_is_the_predictive_entropy_recentred_on_the_threshold():
    p = torch.tensor([0.01, 0.3, 0.5, 0.8, 0.85, 0.99])
    binary = entropy(torch.stack([1 - p, p], -1))
    torch.testing.assert_close(mb.verdict_entropy(p, 0.5), binary)  # one and the same at threshold 0.5
    at = mb.verdict_entropy(p, 0.8)
    assert at[3].item() == pytest.approx(math.log(2))  # ln 2 at the threshold itself
    # Threshold 0.8: p = 0.85 is a FAKE verdict 0.05 from flipping, p = 0.3 a REAL one far from it; the predictive
    # entropy ranks them the wrong way round, the verdict entropy the right way.
    assert binary[4] < binary[1] and at[4] > at[1]
    assert at[0] < at[1] < at[3] and at[5] < at[4] < at[3]  # falls away from the threshold on both sides


def test_verdicts_read_the_configured_reject_score():
    model = build("mc_dropout", threshold=0.8, reject_entropy=0.5, reject_score="verdict_entropy")
    probs = torch.tensor([[0.15, 0.85], [0.7, 0.3], [0.02, 0.98], [0.99, 0.01]])
    out = mb.BayesFakeOutput(probs=probs, predictive_entropy=entropy(probs))
    # verdict entropy: 0.85 -> 0.66 nats (near the threshold), 0.3 -> 0.11, 0.98 -> 0.44, 0.01 -> 0.002
    assert model.verdicts(out) == [mb.VERDICT_UNSURE, mb.VERDICT_REAL, mb.VERDICT_FAKE, mb.VERDICT_REAL]
    model.config.reject_score = "predictive_entropy"  # the same outputs under the older rule
    assert model.verdicts(out) == [mb.VERDICT_FAKE, mb.VERDICT_UNSURE, mb.VERDICT_FAKE, mb.VERDICT_REAL]
    with torch.no_grad():
        full = model(images(), num_samples=T, seed=0)
    torch.testing.assert_close(full.verdict_entropy, mb.verdict_entropy(full.probs[:, 1], 0.8))
    with pytest.raises(ValueError, match="reject_score"):
        BayesFakeConfig(reject_score="entropy")


def test_cut_points_follow_the_verdict_entropy():
    """The adaptive rule's cut points are where ``verdicts`` changes its answer, for either reject score."""
    for score in ("predictive_entropy", "verdict_entropy"):
        model = build("variational", "all", threshold=0.8, reject_entropy=0.5, reject_score=score)
        cuts = model.verdict_cut_points()
        grid = torch.linspace(0.001, 0.999, 4001)
        probs = torch.stack([1 - grid, grid], -1)
        words = model.verdicts(mb.BayesFakeOutput(probs=probs, predictive_entropy=entropy(probs)))
        changes = [float(grid[i:i + 2].mean()) for i in range(len(words) - 1) if words[i] != words[i + 1]]
        assert len(changes) == len(cuts) and all(abs(a - b) < 1e-3 for a, b in zip(changes, cuts)), (score, cuts)
