"""The float64 torch.func oracle and an independent plain forward, shared by the tests.

The oracle differentiates the model's own forward; the forward itself is checked separately against
`reference_step`, written here from docs/design.md section 1 with per-head loops and torch's own normalisation layers, so
the two together pin the derivatives to the specification rather than to the implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastjac as fj


def oracle_jacobian(step, X, C=None):
    """Dense float64 Jacobian by torch.func.jacrev, token-major; [S*D, S*D] or [B, S*D, S*D]."""
    f = (lambda x: step(x)) if C is None else (lambda x: step(x, C))
    if X.dim() == 2:
        n = X.numel()
        return torch.func.jacrev(f)(X).reshape(n, n)
    out = []
    for b in range(X.shape[0]):
        Cb = None if C is None else (C if C.dim() == 2 else C[b])
        fb = (lambda x: step(x)) if Cb is None else (lambda x, Cb=Cb: step(x, Cb))
        n = X[b].numel()
        out.append(torch.func.jacrev(fb)(X[b]).reshape(n, n))
    return torch.stack(out)


def apply_dense(J, T, X):
    """J T for tangents T of X's shape or (k,) + X's shape, with J from oracle_jacobian."""
    k_given = T.dim() == X.dim() + 1
    Tk = T if k_given else T.unsqueeze(0)
    if X.dim() == 2:
        out = torch.einsum("rc,kc->kr", J, Tk.reshape(Tk.shape[0], -1))
    else:
        out = torch.einsum("brc,kbc->kbr", J, Tk.reshape(Tk.shape[0], X.shape[0], -1))
    out = out.reshape(Tk.shape)
    return out if k_given else out[0]


def apply_dense_t(J, G, X):
    """Jᵀ G, as apply_dense with the transpose."""
    return apply_dense(J.transpose(-1, -2), G, X)


def _reference_norm(Z, model):
    N = model.norm_group
    Zg = Z.unflatten(-1, (Z.shape[-1] // N, N))
    if model.norm == "none":
        return Z
    if model.norm == "l2":
        Y = Zg / torch.sqrt((Zg**2).sum(-1, keepdim=True) + model.eps)
    elif model.norm == "rms":
        Y = F.rms_norm(Zg, (N,), eps=model.eps)
    else:
        Y = F.layer_norm(Zg, (N,), eps=model.eps)
    Y = Y.flatten(-2) * model.gamma
    return Y if model.norm_bias is None else Y + model.norm_bias


def reference_msa(X, m):
    """MSA by a loop over heads with torch's scaled_dot_product_attention (math). X: [..., S, D]."""
    out = torch.zeros_like(X) if m.bo is None else torch.zeros_like(X) + m.bo
    for h in range(m.heads):
        q = X @ m.wq[h] + (0 if m.bq is None else m.bq[h])
        k = X @ m.wk[h] + (0 if m.bk is None else m.bk[h])
        v = X @ m.wv[h] + (0 if m.bv is None else m.bv[h])
        o = F.scaled_dot_product_attention(q, k, v, is_causal=m.causal, scale=m.beta)
        out = out + (o if m.wo is None else o @ m.wo[h])
    return out


def reference_step(model, X, C=None):
    """One step of ItrSA or AKOrN written from docs/design.md section 1 independently of fastjac.ops."""
    F_ = reference_msa(X, model) + (0 if C is None else C)
    if isinstance(model, fj.ItrSA):
        return _reference_norm(X + model.eta * F_, model)
    N = model.osc_dim
    g = lambda t: t.unflatten(-1, (t.shape[-1] // N, N))  # noqa: E731
    Xg, Yg = g(X), g(F_)
    W = model.omega
    Om = 0.5 * (W - W.transpose(-1, -2))
    proj = Yg - (Yg * Xg).sum(-1, keepdim=True) * Xg
    Zg = Xg + model.eta * (torch.einsum("gnm,...gm->...gn", Om, Xg) + proj)
    return (Zg / Zg.norm(dim=-1, keepdim=True)).flatten(-2)


def randomize_(model, seed=0, scale=1.0):
    """Give every parameter (gamma, biases, eta included) generic random values, in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if name == "gamma":
                p.copy_(1 + 0.3 * r)
            elif name == "eta":
                p.copy_(0.5 + 0.5 * r.abs())
            elif name in ("bq", "bk", "bv", "bo", "norm_bias"):
                p.copy_(0.3 * r)
            else:
                p.copy_(scale * r / p.shape[-2] ** 0.5 if p.dim() >= 2 else r)
    return model
