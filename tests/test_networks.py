"""Networks: Nature CNN shape/size/scaling, heads, dueling, noisy layers, IQN; numbers worked out by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from dqn_atari import cpu_linear
from dqn_atari.networks import Linear, NoisyLinear, build_network

ATARI = (4, 84, 84)
OBS_MLP = (1, 6)


def frames(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, *ATARI), dtype=torch.uint8, generator=g)


def pin(stream: torch.nn.Sequential, bias: list[float]) -> None:
    """Make a head stream output the constant ``bias`` whatever its input (zero last-layer weights)."""
    last = stream[-1]
    with torch.no_grad():
        if isinstance(last, NoisyLinear):
            last.weight_mu.zero_(), last.weight_sigma.zero_(), last.bias_sigma.zero_()
            last.bias_mu.copy_(torch.tensor(bias))
        else:
            last.weight.zero_()
            last.bias.copy_(torch.tensor(bias))


# ---------------------------------------------------------------------------------------------------------
# Nature CNN
# ---------------------------------------------------------------------------------------------------------


def test_nature_cnn_shapes_and_parameter_count():
    net = build_network(ATARI, 18)
    # Spatial sizes: 84 -> (84-8)/4+1 = 20 -> (20-4)/2+1 = 9 -> 9-3+1 = 7, so 64*7*7 = 3136 features.
    assert net.num_features == 64 * 7 * 7 == 3136
    conv1 = 4 * 32 * 8 * 8 + 32  # 8,224
    conv2 = 32 * 64 * 4 * 4 + 64  # 32,832
    conv3 = 64 * 64 * 3 * 3 + 64  # 36,928
    fc = 3136 * 512 + 512  # 1,606,144
    out = 512 * 18 + 18  # 9,234
    assert conv1 + conv2 + conv3 + fc + out == 1_693_362
    assert sum(p.numel() for p in net.parameters()) == 1_693_362
    result = net(frames(3))
    assert result.q.shape == (3, 18) and result.dist is None and result.taus is None
    assert net.support is None


def test_uint8_frames_are_scaled_by_1_over_255_inside():
    net = build_network(ATARI, 6)
    x = frames(2, seed=1)
    convs = [m for m in net.torso.modules() if isinstance(m, torch.nn.Conv2d)]
    h = x.float() / 255.0
    for conv, stride in zip(convs, (4, 2, 1)):
        h = F.relu(F.conv2d(h, conv.weight, conv.bias, stride=stride))
    fc1, fc2 = net.out_stream[0], net.out_stream[2]
    expected = F.linear(F.relu(F.linear(h.flatten(1), fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
    torch.testing.assert_close(net(x).q, expected)
    # A float input would silently be scaled twice by a caller who pre-divided: refuse it.
    with pytest.raises(ValueError, match="uint8"):
        net(x.float())


def test_default_init_is_uniform_within_one_over_sqrt_fan_in():
    torch.manual_seed(0)
    net = build_network(ATARI, 4)
    layers = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(layers) == 5
    for layer in layers:
        fan_in = layer.weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in)
        assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
        # Not a narrower distribution: a U(-b, b) sample this large gets close to b.
        assert layer.weight.abs().max() > 0.95 * bound


def test_bad_arguments_are_rejected_with_a_useful_message():
    with pytest.raises(ValueError, match="head"):
        build_network(ATARI, 4, head="quantile")
    with pytest.raises(ValueError, match="torso"):
        build_network(ATARI, 4, torso="resnet")
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        build_network((84, 84), 4)
    with pytest.raises(ValueError, match="v_min < v_max"):
        build_network(ATARI, 4, head="c51", v_min=1.0, v_max=-1.0)
    net = build_network((1, 5), 3, torso="mlp")
    with pytest.raises(ValueError, match="shape"):
        net(torch.zeros(2, 1, 6))
    with pytest.raises(ValueError, match="iqn"):
        net(torch.zeros(2, 1, 5), num_taus=8)


# ---------------------------------------------------------------------------------------------------------
# MLP torso, dueling
# ---------------------------------------------------------------------------------------------------------


def test_mlp_torso_layout():
    # mlp_hidden[:-1] is the shared torso, mlp_hidden[-1] the head's hidden FC (one per dueling stream).
    net = build_network((1, 6), 3, torso="mlp", mlp_hidden=(32, 16))
    assert net.num_features == 32
    assert sum(p.numel() for p in net.parameters()) == (6 * 32 + 32) + (32 * 16 + 16) + (16 * 3 + 3)
    assert net(torch.randn(5, 1, 6)).q.shape == (5, 3)
    dueling = build_network((1, 6), 3, torso="mlp", mlp_hidden=(32, 16), dueling=True)
    assert sum(p.numel() for p in dueling.parameters()) == (6 * 32 + 32) + 2 * (32 * 16 + 16) + (16 * 3 + 3) + (16 + 1)


def test_dueling_aggregation_subtracts_the_mean_advantage():
    net = build_network((1, 4), 3, torso="mlp", dueling=True)
    pin(net.value_stream, [2.0])  # V = 2
    pin(net.out_stream, [1.0, 2.0, 6.0])  # A = (1, 2, 6), mean 3
    q = net(torch.randn(4, 1, 4)).q
    # Q = V + A - mean(A) = 2 + (1, 2, 6) - 3
    torch.testing.assert_close(q, torch.tensor([[0.0, 1.0, 5.0]]).expand(4, 3))


def test_dueling_rescales_the_gradient_entering_the_last_conv_layer_by_1_over_sqrt2():
    torch.manual_seed(0)
    net = build_network(ATARI, 4, dueling=True)
    plain = copy.deepcopy(net)
    plain.torso_grad_scale = 1.0  # the same network without the rescaling
    x = frames(2)
    net(x).q.sum().backward()
    plain(x).q.sum().backward()
    torso, torso_plain = dict(net.torso.named_parameters()), dict(plain.torso.named_parameters())
    for name, p in torso.items():  # every conv parameter, the last conv layer first in line
        torch.testing.assert_close(p.grad, torso_plain[name].grad / math.sqrt(2.0))
    for p, p_plain in zip(net.value_stream.parameters(), plain.value_stream.parameters()):
        torch.testing.assert_close(p.grad, p_plain.grad)  # the streams themselves are untouched
    assert build_network(ATARI, 4).torso_grad_scale == 1.0


# ---------------------------------------------------------------------------------------------------------
# Distributional heads
# ---------------------------------------------------------------------------------------------------------


def test_c51_support_and_expected_value():
    net = build_network((1, 4), 2, torso="mlp", head="c51")
    torch.testing.assert_close(net.support, torch.linspace(-10.0, 10.0, 51))
    assert net.support[1] - net.support[0] == pytest.approx(0.4)
    logits = torch.zeros(2, 51)
    logits[1, 50] = 100.0  # action 1: all mass on z = +10
    logits[0, :2] = math.log(3.0)  # action 0: atoms -10 and -9.6 three times as likely as each other atom
    pin(net.out_stream, logits.flatten().tolist())
    out = net(torch.randn(3, 1, 4))
    assert out.dist.shape == (3, 2, 51)
    # action 0: sum z p = (3*(-10) + 3*(-9.6) + sum of the other 49 atoms) / (3 + 3 + 49); the 51 atoms sum to 0.
    expected_0 = (3 * -10.0 + 3 * -9.6 + (10.0 + 9.6)) / 55.0
    torch.testing.assert_close(out.q, torch.tensor([[expected_0, 10.0]]).expand(3, 2))


def test_qr_midpoints_and_mean():
    net = build_network((1, 4), 3, torso="mlp", head="qr")
    out = net(torch.randn(2, 1, 4))
    assert out.dist.shape == (2, 3, 200) and out.taus.shape == (200,)
    # tau_hat_i = (2i - 1) / 400: 0.0025, 0.0075, ..., 0.9975
    assert out.taus[0].item() == pytest.approx(0.0025) and out.taus[-1].item() == pytest.approx(0.9975)
    torch.testing.assert_close(out.taus[1:] - out.taus[:-1], torch.full((199,), 0.005))
    torch.testing.assert_close(out.q, out.dist.mean(dim=-1))


def test_iqn_shapes_taus_and_cosine_embedding():
    net = build_network(ATARI, 5, head="iqn")
    assert net.tau_embedding.i_pi[0] == 0.0 and net.tau_embedding.i_pi[1] == pytest.approx(math.pi)  # i = 0..63
    assert net.tau_embedding.i_pi.shape == (64,)
    x = frames(3)
    out = net(x)  # K = 32 taus for acting by default
    assert out.dist.shape == (3, 5, 32) and out.taus.shape == (3, 32)
    assert ((out.taus > 0) & (out.taus < 1)).all()
    torch.testing.assert_close(out.q, out.dist.mean(dim=-1))
    assert net(x, num_taus=7).dist.shape == (3, 5, 7)
    # Given taus are used as given, and each tau's quantile depends on that tau only: permuting taus permutes
    # the outputs (the order of the sampled fractions carries no meaning).
    taus = torch.rand(3, 6)
    perm = torch.randperm(6)
    a, b = net(x, taus=taus), net(x, taus=taus[:, perm])
    torch.testing.assert_close(a.taus, taus)
    torch.testing.assert_close(b.dist, a.dist[..., perm])
    torch.testing.assert_close(a.q, b.q)
    # Sampling uses torch's global RNG, so seeding reproduces it.
    torch.manual_seed(3)
    c = net(x, num_taus=4)
    torch.manual_seed(3)
    torch.testing.assert_close(net(x, num_taus=4).dist, c.dist)
    with pytest.raises(ValueError, match="taus"):
        net(x, taus=torch.rand(2, 6))


def test_iqn_embedding_multiplies_the_torso_features():
    # Dabney et al. 2018b, Sec. 3.1: psi(x) * phi(tau). A zero embedding (phi = ReLU(0) = 0) therefore erases the
    # observation: every input gives the same quantiles; a sum instead of a product would not.
    net = build_network(OBS_MLP, 3, torso="mlp", head="iqn")
    with torch.no_grad():
        net.tau_embedding.linear.weight.zero_()
        net.tau_embedding.linear.bias.zero_()
    taus = torch.rand(1, 4).expand(5, 4)
    dist = net(torch.randn(5, *OBS_MLP), taus=taus).dist
    torch.testing.assert_close(dist, dist[:1].expand(5, 3, 4))
    with torch.no_grad():
        net.tau_embedding.linear.bias.fill_(1.0)  # phi = 1: the plain torso features again
    dist = net(torch.randn(5, *OBS_MLP), taus=taus).dist
    assert (dist - dist[:1]).abs().max() > 1e-3


def test_every_head_composes_with_dueling_and_noise_rainbow_included():
    for head, depth in (("q", None), ("c51", 51), ("qr", 200), ("iqn", 32)):
        net = build_network(ATARI, 4, head=head, dueling=True, noisy=True)
        out = net(frames(2))
        assert out.q.shape == (2, 4)
        if depth is not None:
            assert out.dist.shape == (2, 4, depth)
        # Noisy layers replace both FC layers of both streams; the conv torso is not noisy.
        assert len([m for m in net.modules() if isinstance(m, NoisyLinear)]) == 4
        assert not any(isinstance(m, torch.nn.Linear) for m in net.out_stream.modules())


# ---------------------------------------------------------------------------------------------------------
# Noisy nets
# ---------------------------------------------------------------------------------------------------------


def test_noisy_linear_initialisation():
    torch.manual_seed(0)
    layer = NoisyLinear(400, 30, sigma0=0.5)
    # Fortunato et al. 2018, Sec. 3.2: sigma = sigma0 / sqrt(p) = 0.5 / 20, mu ~ U(-1/sqrt(p), 1/sqrt(p)).
    torch.testing.assert_close(layer.weight_sigma, torch.full((30, 400), 0.025))
    torch.testing.assert_close(layer.bias_sigma, torch.full((30,), 0.025))
    assert layer.weight_mu.abs().max() <= 0.05 and layer.weight_mu.abs().max() > 0.049
    assert layer.bias_mu.abs().max() <= 0.05


def test_noisy_linear_noise_is_factorised_with_f_sign_sqrt():
    layer = NoisyLinear(5, 3)
    torch.manual_seed(11)
    layer.reset_noise()
    torch.manual_seed(11)  # reset_noise draws eps_in (p values) first, then eps_out (q values)
    raw_in, raw_out = torch.randn(5), torch.randn(3)
    f_in, f_out = raw_in.sign() * raw_in.abs().sqrt(), raw_out.sign() * raw_out.abs().sqrt()
    torch.testing.assert_close(layer.weight_epsilon, torch.outer(f_out, f_in))
    assert torch.linalg.matrix_rank(layer.weight_epsilon) == 1
    w = layer.weight_mu + layer.weight_sigma * torch.outer(f_out, f_in)
    b = layer.bias_mu + layer.bias_sigma * f_out
    # Both code paths (few rows: factorised matmuls; many rows: explicit noisy weight) are this same layer.
    for rows in (1, layer.factorised_max_rows, layer.factorised_max_rows + 1, 300):
        x = torch.randn(rows, 5)
        torch.testing.assert_close(layer(x), x @ w.T + b)
    # ... with the same gradients for mu and sigma.
    x = torch.randn(3, 5)
    grads = []
    for max_rows in (64, 0):
        layer.factorised_max_rows = max_rows
        layer.zero_grad()
        layer(x).square().sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters()])
    for g_factorised, g_explicit in zip(*grads):
        torch.testing.assert_close(g_factorised, g_explicit)


def test_noise_is_fixed_until_reset_and_off_means_mean_weights():
    torch.manual_seed(0)
    layer = NoisyLinear(8, 4)
    x = torch.randn(3, 8)
    y1 = layer(x)
    torch.testing.assert_close(layer(x), y1)  # fixed between resets
    layer.reset_noise()
    y2 = layer(x)
    assert (y2 - y1).abs().max() > 1e-3  # new noise, new output
    layer.noise_enabled = False
    mean = F.linear(x, layer.weight_mu, layer.bias_mu)
    torch.testing.assert_close(layer(x), mean)
    layer.reset_noise()
    torch.testing.assert_close(layer(x), mean)  # deterministic whatever the noise buffers hold


def test_network_noise_switch_reset_and_independent_copies():
    torch.manual_seed(0)
    net = build_network((1, 6), 4, torso="mlp", head="c51", dueling=True, noisy=True)
    x = torch.randn(5, 1, 6)
    q1 = net(x).q
    net.reset_noise()
    q2 = net(x).q
    assert (q2 - q1).abs().max() > 1e-4
    # eval() does not switch noise off (the target net must stay noisy); set_noise does.
    net.eval()
    torch.testing.assert_close(net(x).q, q2)
    net.set_noise(False)
    assert not net.noise_enabled
    q_eval = net(x).q
    net.reset_noise()
    torch.testing.assert_close(net(x).q, q_eval)
    net.set_noise(True)
    assert net.noise_enabled
    # A deep copy (how the agent makes its target network) owns its noise: resetting one leaves the other.
    target = copy.deepcopy(net)
    before = net(x).q
    target.reset_noise()
    torch.testing.assert_close(net(x).q, before)
    assert (target(x).q - before).abs().max() > 1e-4


def test_reset_noise_is_a_no_op_without_noisy_layers():
    net = build_network((1, 6), 4, torso="mlp")
    x = torch.randn(2, 1, 6)
    q = net(x).q
    net.reset_noise()
    net.set_noise(False)
    torch.testing.assert_close(net(x).q, q)


# ---------------------------------------------------------------------------------------------------------
# Large linear layers on CPU: oneDNN's product (dqn_atari.cpu_linear)
# ---------------------------------------------------------------------------------------------------------


def test_large_linear_layers_take_onednn_and_compute_what_f_linear_does():
    """The Nature head's 3136 -> 512 layer (plain, dueling, noisy) goes through oneDNN where torch has it; forward and
    both gradients equal F.linear's to float32 rounding, and torch's FLOP counter counts it as a matrix product."""
    from torch.utils.flop_counter import FlopCounterMode

    if torch.backends.mkldnn.is_available():
        assert cpu_linear.usable()
    net = build_network(ATARI, 6, dueling=True)
    noisy = build_network(ATARI, 6, noisy=True)
    big = [net.out_stream[0], net.value_stream[0], noisy.out_stream[0]]
    assert all(layer.onednn == cpu_linear.usable() for layer in big)
    assert not net.out_stream[2].onednn and not net.value_stream[2].onednn  # 512 -> 6: F.linear
    layer = net.out_stream[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3136, generator=g, requires_grad=True)
    upstream = torch.randn(32, 512, generator=g)
    ours = layer(x)
    ours_grads = torch.autograd.grad(ours, (x, layer.weight, layer.bias), upstream)
    plain = F.linear(x, layer.weight, layer.bias)
    plain_grads = torch.autograd.grad(plain, (x, layer.weight, layer.bias), upstream)
    for a, b in zip((ours, *ours_grads), (plain, *plain_grads)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with FlopCounterMode(display=False) as counter:  # forward, and the backward's two products
        layer(x).backward(upstream)
    assert counter.get_total_flops() == 3 * 2 * 32 * 3136 * 512


def test_iqn_tau_embedding_takes_onednn_with_its_3d_input():
    """IQN's 64 -> 3136 embedding gets (B, T, 64) inputs: flattened into rows for oneDNN, with the (B, T, 3136)
    result and gradients F.linear gives."""
    from torch.utils.flop_counter import FlopCounterMode

    layer = build_network(ATARI, 6, head="iqn").tau_embedding.linear
    if not layer.onednn:
        pytest.skip("oneDNN's product is not usable here")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 8, 64, generator=g, requires_grad=True)
    upstream = torch.randn(4, 8, 3136, generator=g)
    ours = layer(x)
    assert ours.shape == (4, 8, 3136)
    ours_grads = torch.autograd.grad(ours, (x, layer.weight, layer.bias), upstream)
    plain = F.linear(x, layer.weight, layer.bias)
    plain_grads = torch.autograd.grad(plain, (x, layer.weight, layer.bias), upstream)
    for a, b in zip((ours, *ours_grads), (plain, *plain_grads)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with FlopCounterMode(display=False) as counter:  # last: under torch 2.5 its hooks broke a later grad
        layer(x).backward(upstream)
    assert counter.get_flop_counts()["Global"] == {torch.ops.dqn_atari.linear: 3 * 2 * 32 * 64 * 3136}


def test_onednn_linear_under_vmap_gives_each_slice_what_it_gives_alone():
    """K runs trained together (vmap over stacked weights and batches, with gradients) get, per run, the product
    the run gets alone, bit for bit."""
    from torch.func import grad, vmap

    layer = Linear(3136, 512)
    if not layer.onednn:
        pytest.skip("oneDNN's product is not usable here")
    g = torch.Generator().manual_seed(1)
    weights, biases = torch.randn(3, 512, 3136, generator=g), torch.randn(3, 512, generator=g)
    xs = torch.randn(3, 8, 3136, generator=g)

    def loss(w, b, x):
        return cpu_linear.linear(x, w, b, True).square().sum()

    together = vmap(grad(loss, argnums=(0, 1)))(weights, biases, xs)
    for k in range(3):
        alone = grad(loss, argnums=(0, 1))(weights[k], biases[k], xs[k])
        for t, a in zip(together, alone):
            assert torch.equal(t[k], a)
