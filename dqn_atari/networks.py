"""Q-networks for Nature DQN and its descendants: one torso, one head, composable switches.

    obs -> torso (Nature CNN | MLP) -> [x IQN tau embedding] -> head stream(s) -> NetOut(q, dist, taus)

Heads: ``q`` (Mnih et al. 2015), ``c51`` (Bellemare et al. 2017), ``qr`` (Dabney et al. 2018a),
``iqn`` (Dabney et al. 2018b). Every head composes with ``dueling`` (Wang et al. 2016) and ``noisy``
(Fortunato et al. 2018); Rainbow (Hessel et al. 2018) is ``head="c51", dueling=True, noisy=True``.

Initialisation: PyTorch's defaults for ``nn.Conv2d`` / ``nn.Linear``, i.e. weights and biases drawn from
U(-1/sqrt(fan_in), +1/sqrt(fan_in)) (kaiming_uniform with a=sqrt(5) reduces to exactly that bound). That is
the same distribution as Torch7's ``nn.Linear``/``nn.SpatialConvolution`` ``reset()``, which DeepMind's
released Lua DQN code used; the Nature paper itself does not state an initialisation.
Noisy layers use their own initialisation (Fortunato et al. 2018, Sec. 3.2), see :class:`NoisyLinear`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dqn_atari import cpu_linear

HEADS = ("q", "c51", "qr", "iqn")
TORSOS = ("nature_cnn", "mlp")


class NetOut(NamedTuple):
    """What every network returns.

    q:    (B, A) action values; the expectation for distributional heads. Use it for acting and argmax.
    dist: C51: logits (B, A, atoms); QR: quantile values (B, A, N); IQN: quantile values (B, A, T) at ``taus``;
          None for the ``q`` head.
    taus: IQN: the (B, T) quantile fractions used; QR: the (N,) fixed midpoints; else None.
    """

    q: Tensor
    dist: Tensor | None
    taus: Tensor | None


# ----------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------


class Linear(nn.Linear):
    """``nn.Linear`` (the same parameters, initialisation and state_dict) whose products, for a large layer on CPU,
    go through oneDNN instead of torch's BLAS: ~2x faster on AMD processors, the same float32 products up to the
    order of the sums (dqn_atari.cpu_linear)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features)
        self.onednn = cpu_linear.worth_it(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return cpu_linear.linear(x, self.weight, self.bias, self.onednn)


class NoisyLinear(nn.Module):
    """Linear layer with factorised Gaussian parameter noise (Fortunato et al. 2018, Sec. 3 and 3.2).

    y = (mu_w + sigma_w * eps_w) x + (mu_b + sigma_b * eps_b), with eps_w = f(eps_out) f(eps_in)^T,
    eps_b = f(eps_out) (Eqs. 10-11), f(x) = sgn(x) sqrt(|x|) and eps_in ~ N(0, I_p), eps_out ~ N(0, I_q): only p + q
    Gaussian draws per layer instead of p*q (the variant the paper uses for DQN and Dueling).

    Init (Sec. 3.2, factorised case): mu ~ U(-1/sqrt(p), 1/sqrt(p)), sigma = sigma0 / sqrt(p), sigma0 = 0.5.

    Noise is held fixed between calls to :meth:`reset_noise` (the paper resamples it after every optimisation
    step and acts with fixed noise in between). ``noise_enabled = False`` makes the layer the deterministic
    mean network ``mu_w x + mu_b`` (used for evaluation, see :meth:`QNetwork.set_noise`). The f-transformed
    noise vectors are persistent buffers, so a checkpoint restores the exact acting noise.
    """

    def __init__(self, in_features: int, out_features: int, sigma0: float = 0.5):
        super().__init__()
        if sigma0 < 0:
            raise ValueError(f"noisy_sigma0 must be >= 0, got {sigma0}; the paper uses 0.5.")
        self.in_features, self.out_features, self.sigma0 = in_features, out_features, sigma0
        self.weight_mu = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_sigma = nn.Parameter(torch.empty(out_features, in_features))
        self.bias_mu = nn.Parameter(torch.empty(out_features))
        self.bias_sigma = nn.Parameter(torch.empty(out_features))
        self.register_buffer("eps_in", torch.zeros(in_features))  # f(eps_in)
        self.register_buffer("eps_out", torch.zeros(out_features))  # f(eps_out), also the bias noise
        self.noise_enabled = True
        self.onednn = cpu_linear.worth_it(in_features, out_features)  # see Linear
        self.reset_parameters()
        self.reset_noise()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        self.weight_mu.uniform_(-bound, bound)
        self.bias_mu.uniform_(-bound, bound)
        self.weight_sigma.fill_(self.sigma0 * bound)
        self.bias_sigma.fill_(self.sigma0 * bound)

    @staticmethod
    def _f(x: Tensor) -> Tensor:
        return x.sign() * x.abs().sqrt()

    @torch.no_grad()
    def reset_noise(self) -> None:
        """Draw new factorised noise from torch's global RNG (eps_in first, then eps_out)."""
        self.eps_in.copy_(self._f(torch.randn(self.in_features, device=self.eps_in.device)))
        self.eps_out.copy_(self._f(torch.randn(self.out_features, device=self.eps_out.device)))

    @property
    def weight_epsilon(self) -> Tensor:
        """The (q, p) weight noise eps_w = f(eps_out) f(eps_in)^T."""
        return torch.outer(self.eps_out, self.eps_in)

    # Below this many input rows, the factorised form (two thin matmuls) beats building the (q, p) noisy weight;
    # for a 3136 -> 512 layer on CPU it is ~15x faster at batch 1 (acting), a little faster at batch 32, slower
    # from ~100 rows (IQN's batch x taus rows). Both forms compute the same function.
    factorised_max_rows = 64

    def forward(self, x: Tensor) -> Tensor:
        if not self.noise_enabled:
            return self._linear(x, self.weight_mu, self.bias_mu)
        if x.numel() <= self.factorised_max_rows * self.in_features:
            # (sigma_w * f_out f_in^T) x = f_out * (sigma_w (f_in * x))
            noise = self._linear(x * self.eps_in, self.weight_sigma, self.bias_sigma) * self.eps_out
            return self._linear(x, self.weight_mu, self.bias_mu) + noise
        weight = self.weight_mu + self.weight_sigma * self.weight_epsilon
        bias = self.bias_mu + self.bias_sigma * self.eps_out
        return self._linear(x, weight, bias)

    def _linear(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return cpu_linear.linear(x, weight, bias, self.onednn)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, sigma0={self.sigma0}"


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient multiplied by ``scale`` backward. Written in the setup_context form so that
    torch.func transforms (K runs' updates as one vmapped gradient, dqn_atari.agent_group) can apply it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, scale: float) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: Tensor) -> None:
        ctx.scale = inputs[1]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """Return ``x`` unchanged; its gradient is multiplied by ``scale`` on the way back."""
    return _ScaleGrad.apply(x, scale)


class NatureCNN(nn.Module):
    """Mnih et al. 2015, Methods ("Model architecture"): conv 32 8x8/4, conv 64 4x4/2, conv 64 3x3/1, ReLU.

    Takes uint8 frames and scales them by 1/255 here, so the replay stores 1 byte per pixel.
    Output: the flattened last conv layer (3136 = 64*7*7 features for 84x84 input).
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3, stride=1), nn.ReLU(),
            nn.Flatten(),
        )

    def forward(self, obs: Tensor) -> Tensor:
        return self.convs(obs.float() * (1.0 / 255.0))


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers)


def _stream(in_features: int, hidden: int, out_features: int, noisy: bool, sigma0: float) -> nn.Sequential:
    """FC(hidden) -> ReLU -> FC(out): the Nature head, and each dueling stream (Wang et al. 2016, Sec. 4.2:
    value and advantage streams each have a 512-unit FC layer). Noisy nets replace both layers
    (Fortunato et al. 2018, Sec. 3.1: the fully connected layers become noisy; the conv layers do not)."""

    def linear(n_in: int, n_out: int) -> nn.Module:
        return NoisyLinear(n_in, n_out, sigma0) if noisy else Linear(n_in, n_out)

    return nn.Sequential(linear(in_features, hidden), nn.ReLU(), linear(hidden, out_features))


class CosineTauEmbedding(nn.Module):
    """IQN quantile-fraction embedding (Dabney et al. 2018b, Sec. 3.1):
    phi_j(tau) = ReLU(sum_{i=0}^{n-1} cos(pi i tau) w_ij + b_j), n = 64, output size = torso features,
    later multiplied elementwise with the torso output."""

    def __init__(self, embedding_dim: int, out_features: int):
        super().__init__()
        self.register_buffer("i_pi", torch.arange(embedding_dim, dtype=torch.float32) * math.pi)
        self.linear = Linear(embedding_dim, out_features)

    def forward(self, taus: Tensor) -> Tensor:  # (B, T) -> (B, T, out_features)
        return F.relu(self.linear(torch.cos(taus.unsqueeze(-1) * self.i_pi)))


# ----------------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------------


class QNetwork(nn.Module):
    """Torso + head. Build it with :func:`build_network`.

    forward(obs, num_taus=None, taus=None) -> NetOut
      obs: uint8 (B, C, H, W) for ``nature_cnn`` (scaled by 1/255 inside); float32 (B, *obs_shape) for ``mlp``.
      IQN only: ``taus`` (B, T) in (0, 1) to evaluate at, or else ``num_taus`` (default ``iqn_num_taus_act``)
      fractions drawn ~ U(0, 1) from torch's global RNG.

    Noise (noisy nets): :meth:`reset_noise` draws new noise; :meth:`set_noise` switches it off for a
    deterministic evaluation with the mean weights. ``train()``/``eval()`` do NOT touch noise: the target
    network must stay noisy (Fortunato et al. 2018, Sec. 3.1: the NoisyNet-DQN target uses its own noise) whatever
    mode it is in, so the switch is explicit.
    """

    support: Tensor | None

    def __init__(self, obs_shape: tuple[int, ...], num_actions: int, *, torso: str, mlp_hidden: tuple[int, ...],
                 head: str, dueling: bool, noisy: bool, noisy_sigma0: float, hidden: int, num_atoms: int,
                 v_min: float, v_max: float, num_quantiles: int, iqn_embedding_dim: int, iqn_num_taus_act: int):
        super().__init__()
        self.obs_shape, self.num_actions = tuple(obs_shape), num_actions
        self.torso_kind, self.head, self.dueling, self.noisy = torso, head, dueling, noisy
        self.iqn_num_taus_act = iqn_num_taus_act

        if torso == "nature_cnn":
            self.torso: nn.Module = NatureCNN(obs_shape[0])
            head_hidden = hidden
        else:
            # MLP: every entry of mlp_hidden but the last is a shared torso layer; the last plays the role of
            # Nature's 512-unit FC inside the head, so it is duplicated per dueling stream and made noisy like
            # the Atari net's. mlp_hidden=(128, 128) is therefore a plain 2-hidden-layer MLP when not dueling.
            self.torso = _mlp([math.prod(obs_shape), *mlp_hidden[:-1]])
            head_hidden = mlp_hidden[-1]
        with torch.no_grad():
            dummy = torch.zeros((1, *obs_shape), dtype=torch.uint8 if torso == "nature_cnn" else torch.float32)
            features = self.torso(dummy).shape[1]
        self.num_features = features

        # Wang et al. 2016, Sec. 4.2: "we rescale the combined gradient entering the last convolutional layer
        # by 1/sqrt(2)" (both streams backpropagate into it). They also clip gradient norms at 10; that is the
        # optimizer's job (agent), not the network's.
        self.torso_grad_scale = 1.0 / math.sqrt(2.0) if dueling else 1.0

        # Per action: 1 value (q, iqn: one quantile per sampled tau), num_atoms logits, num_quantiles values.
        self.per_action = {"q": 1, "iqn": 1, "c51": num_atoms, "qr": num_quantiles}[head]
        self.out_stream = _stream(features, head_hidden, num_actions * self.per_action, noisy, noisy_sigma0)
        self.value_stream = _stream(features, head_hidden, self.per_action, noisy, noisy_sigma0) if dueling else None

        self.tau_embedding = CosineTauEmbedding(iqn_embedding_dim, features) if head == "iqn" else None
        if head == "c51":
            # Bellemare et al. 2017, Sec. 5 / Hessel et al. 2018, Table 1: 51 atoms evenly on [-10, 10].
            self.register_buffer("support", torch.linspace(v_min, v_max, num_atoms))
        else:
            self.support = None
        if head == "qr":
            # Dabney et al. 2018a, Lemma 2 / Sec. 3: quantile midpoints tau_hat_i = (2i - 1) / (2N), i = 1..N.
            self.register_buffer("quantile_taus", (2 * torch.arange(1, num_quantiles + 1) - 1) / (2.0 * num_quantiles))
        else:
            self.quantile_taus = None
        self._noisy_layers = [m for m in self.modules() if isinstance(m, NoisyLinear)]

    # -- noise -------------------------------------------------------------------------------------------------
    def reset_noise(self) -> None:
        """Resample the noise of every noisy layer; a no-op when the network is not noisy."""
        for layer in self._noisy_layers:
            layer.reset_noise()

    def set_noise(self, enabled: bool) -> None:
        """Turn parameter noise on (training, acting while learning) or off (deterministic evaluation with
        the mean weights mu). A no-op for networks without noisy layers.

        Evaluation: Fortunato et al. 2018 specify noisy acting during training (Algorithm 1); we found no
        explicit evaluation rule in the paper. Google's Dopamine (``NoisyNetwork(eval_mode=True)`` in its full
        Rainbow) and Kaixhin/Rainbow evaluate with the noise off, which is what ``set_noise(False)`` gives; keep
        it on to score the stochastic training-time policy instead."""
        for layer in self._noisy_layers:
            layer.noise_enabled = bool(enabled)

    @property
    def noise_enabled(self) -> bool:
        return any(layer.noise_enabled for layer in self._noisy_layers)

    # -- forward ------------------------------------------------------------------------------------------------
    def _check_obs(self, obs: Tensor) -> None:
        if tuple(obs.shape[1:]) != self.obs_shape:
            raise ValueError(f"obs has shape {tuple(obs.shape)}, expected (B, {', '.join(map(str, self.obs_shape))}) "
                             "as given to build_network(obs_shape=...); add the batch dimension or fix obs_shape.")
        if self.torso_kind == "nature_cnn" and obs.dtype != torch.uint8:
            raise ValueError(f"the nature_cnn torso takes uint8 frames (it scales by 1/255 itself), got {obs.dtype}; "
                             "pass the replay's uint8 frames unconverted.")

    def _iqn_taus(self, batch: int, device: torch.device, num_taus: int | None, taus: Tensor | None) -> Tensor:
        if taus is not None:
            if taus.dim() != 2 or taus.shape[0] != batch:
                raise ValueError(f"IQN taus must have shape (B={batch}, T), got {tuple(taus.shape)}.")
            return taus
        n = self.iqn_num_taus_act if num_taus is None else num_taus
        if n < 1:
            raise ValueError(f"num_taus must be >= 1, got {n}.")
        return torch.rand(batch, n, device=device)

    def forward(self, obs: Tensor, num_taus: int | None = None, taus: Tensor | None = None) -> NetOut:
        self._check_obs(obs)
        if self.head != "iqn" and (num_taus is not None or taus is not None):
            raise ValueError(f"num_taus/taus only apply to the iqn head; this network's head is {self.head!r}.")
        batch = obs.shape[0]
        features = self.torso(obs)
        if self.torso_grad_scale != 1.0:
            features = scale_grad(features, self.torso_grad_scale)

        if self.head == "iqn":
            taus = self._iqn_taus(batch, obs.device, num_taus, taus)
            # Dabney et al. 2018b, Sec. 3.1: Z_tau(x, a) = f(psi(x) * phi(tau)), the Hadamard product of torso
            # features and tau embedding, one row per (sample, tau).
            features = (features.unsqueeze(1) * self.tau_embedding(taus)).flatten(0, 1)

        out = self.out_stream(features).view(-1, self.num_actions, self.per_action)
        if self.value_stream is not None:
            # Wang et al. 2016, Eq. 9: Q = V + A - mean_a A. For distributions this is done per atom on the logits
            # (Hessel et al. 2018, Sec. 3 "Dueling") and per quantile for QR/IQN.
            value = self.value_stream(features).view(-1, 1, self.per_action)
            out = value + out - out.mean(dim=1, keepdim=True)

        if self.head == "q":
            return NetOut(out.squeeze(-1), None, None)
        if self.head == "c51":
            # Bellemare et al. 2017, Algorithm 1: Q(x, a) = sum_i z_i p_i(x, a).
            q = (out.softmax(dim=-1) * self.support).sum(dim=-1)
            return NetOut(q, out, None)
        if self.head == "qr":
            # Dabney et al. 2018a, Algorithm 1: Q(x, a) = (1/N) sum_j theta_j(x, a).
            return NetOut(out.mean(dim=-1), out, self.quantile_taus)
        # iqn: rows were (sample, tau); regroup to (B, A, T). Q is the mean over the sampled taus
        # (Dabney et al. 2018b, Sec. 4: K = 32 samples for acting).
        quantiles = out.view(batch, -1, self.num_actions).transpose(1, 2)
        return NetOut(quantiles.mean(dim=-1), quantiles, taus)


def build_network(obs_shape: tuple[int, ...], num_actions: int, *, torso: str = "nature_cnn",
                  mlp_hidden: tuple[int, ...] = (128, 128), head: str = "q", dueling: bool = False,
                  noisy: bool = False, noisy_sigma0: float = 0.5, hidden: int = 512, num_atoms: int = 51,
                  v_min: float = -10.0, v_max: float = 10.0, num_quantiles: int = 200,
                  iqn_embedding_dim: int = 64, iqn_num_taus_act: int = 32) -> QNetwork:
    """Build a Q-network; the defaults are the papers' Atari settings.

    hidden: FC size of the head (Mnih et al. 2015: 512) for the nature_cnn torso. The mlp torso uses
      mlp_hidden[-1] as the head's hidden FC and mlp_hidden[:-1] as shared layers.
    num_atoms, v_min, v_max: C51, 51 atoms on [-10, 10] (Bellemare et al. 2017, Sec. 5).
    num_quantiles: QR-DQN, N = 200 (Dabney et al. 2018a, Sec. 5).
    iqn_embedding_dim, iqn_num_taus_act: IQN, n = 64 cosines and K = 32 taus for acting (Dabney et al. 2018b,
      Sec. 3.1 and 4).
    noisy_sigma0: 0.5 for factorised noise (Fortunato et al. 2018, Sec. 3.2).
    """
    if torso not in TORSOS:
        raise ValueError(f"torso={torso!r} is unknown; choose one of {TORSOS}.")
    if head not in HEADS:
        raise ValueError(f"head={head!r} is unknown; choose one of {HEADS}.")
    if num_actions < 1:
        raise ValueError(f"num_actions must be >= 1, got {num_actions}.")
    obs_shape = tuple(int(d) for d in obs_shape)
    if torso == "nature_cnn":
        if len(obs_shape) != 3:
            raise ValueError(f"nature_cnn needs obs_shape (C, H, W) such as (4, 84, 84), got {obs_shape}: the env's "
                             f"observations are vectors. For CartPole train configs/control/cartpole.yaml (an MLP "
                             f"torso, settings scaled to the task), or set network.torso=mlp.")
        if min(obs_shape[1:]) < 36:
            raise ValueError(f"nature_cnn needs frames of at least 36x36 (84x84 in the paper), got {obs_shape[1:]}.")
    else:
        if not mlp_hidden or min(mlp_hidden) < 1:
            raise ValueError(f"mlp_hidden must be a non-empty tuple of positive sizes, got {mlp_hidden}; "
                             "its last entry is the head's hidden layer.")
    if hidden < 1:
        raise ValueError(f"hidden must be >= 1, got {hidden}.")
    if head == "c51":
        if num_atoms < 2:
            raise ValueError(f"c51 needs num_atoms >= 2, got {num_atoms}.")
        if not v_min < v_max:
            raise ValueError(f"c51 needs v_min < v_max, got v_min={v_min}, v_max={v_max}.")
    if head == "qr" and num_quantiles < 1:
        raise ValueError(f"qr needs num_quantiles >= 1, got {num_quantiles}.")
    if head == "iqn" and (iqn_embedding_dim < 1 or iqn_num_taus_act < 1):
        raise ValueError(f"iqn needs iqn_embedding_dim >= 1 and iqn_num_taus_act >= 1, "
                         f"got {iqn_embedding_dim} and {iqn_num_taus_act}.")
    return QNetwork(obs_shape, num_actions, torso=torso, mlp_hidden=tuple(mlp_hidden), head=head, dueling=dueling,
                    noisy=noisy, noisy_sigma0=noisy_sigma0, hidden=hidden, num_atoms=num_atoms, v_min=v_min,
                    v_max=v_max, num_quantiles=num_quantiles, iqn_embedding_dim=iqn_embedding_dim,
                    iqn_num_taus_act=iqn_num_taus_act)
