"""The paper's conceptual setting: a one-layer transformer on discriminative-pattern tasks.

Li et al. (ICLR 2025) study binary tasks whose label is carried by a *discriminative pattern*:
a sequence is labelled +1 when it contains ``mu_t`` and -1 when it contains ``-mu_t``; every
other token is one of many *irrelevant patterns* (orthogonal to all discriminative ones) plus
a little Gaussian noise. The model is one softmax-attention head followed by a ReLU MLP and a
linear readout, averaged over positions::

    f(X) = 1/P sum_l  a . relu(W_O sum_s W_V x_s softmax_s(x_s . W_K^T W_Q x_l))

Here every parameter is trained (the paper keeps ``a`` fixed); the model is evaluated
functionally from a dict of tensors, so a composed state (base + sum alpha_t tau_t) needs no
``nn.Module``.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Tensor names, as they appear in the safetensors checkpoints and in the tvbase store.
PARAM_SHAPES = {  # filled in by ``param_shapes`` from the dimensions
    "attn.q.weight": ("d", "d"),
    "attn.k.weight": ("d", "d"),
    "attn.v.weight": ("dv", "d"),
    "mlp.fc.weight": ("m", "dv"),
    "head.weight": (1, "m"),
}


@dataclass(frozen=True)
class Dims:
    d: int = 32  # token dimension
    dv: int = 32  # value dimension
    m: int = 64  # MLP width
    seq: int = 12  # tokens per sequence
    n_signal: int = 2  # tokens carrying the (signed) discriminative pattern per sequence
    noise: float = 0.1  # std of the Gaussian noise added to every token (norm ~ noise * sqrt(d))


def param_shapes(dims):
    sizes = {"d": dims.d, "dv": dims.dv, "m": dims.m}
    return {name: tuple(sizes.get(s, s) for s in shape) for name, shape in PARAM_SHAPES.items()}


def init_params(dims, gen):
    """Random initialization (fan-in scaled), float32, on CPU."""
    return {name: torch.randn(shape, generator=gen) / math.sqrt(shape[-1]) for name, shape in param_shapes(dims).items()}


def _softmax(scores):
    """Softmax over the last dimension. torch.softmax is several times slower on CPU for the
    short rows (P = 12) used here; this is the same formula."""
    e = (scores - scores.amax(-1, keepdim=True)).exp()
    return e / e.sum(-1, keepdim=True)


def forward(p, x):
    """Logits (N,) for sequences ``x`` (N, P, d) under parameters ``p`` (dict of tensors).

    Computed with the products folded, ``(x W_Q^T)(x W_K^T)^T = x (W_Q^T W_K) x^T`` and
    ``(A x W_V^T) W_O^T = (A x)(W_O W_V)^T``: the same function with fewer large matmuls.
    """
    scores = (x @ (p["attn.q.weight"].T @ p["attn.k.weight"])) @ x.transpose(1, 2)  # (N, P, P)
    attn = _softmax(scores)  # query l attends to keys s
    h = torch.relu((attn @ x) @ (p["mlp.fc.weight"] @ p["attn.v.weight"]).T)  # (N, P, m)
    return (h @ p["head.weight"].T).squeeze(-1).mean(-1)


@torch.no_grad()
def accuracy(p, data):
    x, y = data
    return float((torch.sign(forward(p, x)) == y).float().mean())


def train(p, data, steps, lr, momentum=0.9, weight_decay=0.0):
    """Full-batch SGD on the logistic loss; returns new parameters (``p`` is not modified)."""
    p = {name: t.clone().requires_grad_(True) for name, t in p.items()}
    opt = torch.optim.SGD(list(p.values()), lr=lr, momentum=momentum, weight_decay=weight_decay)
    x, y = data
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.softplus(-y * forward(p, x)).mean()
        loss.backward()
        opt.step()
    return {name: t.detach().clone() for name, t in p.items()}


class Patterns:
    """An orthonormal frame of R^d: the first ``n_disc`` directions are available for
    discriminative patterns, the rest are the irrelevant patterns shared by every task."""

    def __init__(self, dims, n_disc, gen):
        q, _ = torch.linalg.qr(torch.randn(dims.d, dims.d, generator=gen))
        self.dims = dims
        self.disc = q[:, :n_disc].T.contiguous()  # (n_disc, d)
        self.irrelevant = q[:, n_disc:].T.contiguous()  # (d - n_disc, d)

    def e(self, i):
        return self.disc[i]


def sample_task(patterns, mu, n, gen, confounder=None):
    """``n`` labelled sequences of the task with discriminative pattern ``mu`` (d,).

    Each sequence holds ``n_signal`` copies of ``y * mu`` at random positions, irrelevant
    patterns everywhere else, and Gaussian noise on every token. With ``confounder`` (d,), one
    further ``n_signal`` positions hold ``s * confounder`` with a random sign ``s`` independent of ``y``.
    Returns (x (n, P, d), y (n,) in {-1, +1}).
    """
    dims = patterns.dims
    y = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
    which = torch.randint(0, patterns.irrelevant.shape[0], (n, dims.seq), generator=gen)
    x = patterns.irrelevant[which]  # (n, P, d)
    order = torch.argsort(torch.rand(n, dims.seq, generator=gen), dim=1)
    rows = torch.arange(n)[:, None]
    signal_pos = order[:, : dims.n_signal]
    x[rows, signal_pos] = (y[:, None, None] * mu).expand(n, dims.n_signal, -1)
    if confounder is not None:
        s = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
        conf_pos = order[:, dims.n_signal : 2 * dims.n_signal]
        x[rows, conf_pos] = (s[:, None, None] * confounder).expand(n, dims.n_signal, -1)
    x = x + dims.noise * torch.randn(x.shape, generator=gen)
    return x, y
