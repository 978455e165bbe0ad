"""Third-party modules as looped steps on fastjac's callable path: their Lyapunov spectra, JVPs and regularisers
against the torch.func oracle with PyTorch's math SDPA forced (and the fused fast paths off), float64.

transformers is an optional test dependency (the "thirdparty" extra, which the "test" extra includes, so CI runs
these); its tests skip, saying so, only where it is not installed.
"""

import importlib.util

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastjac as fj
from fastjac.train import regularizers as R

D64 = torch.float64
TOL = 1e-10
HAS_TF = importlib.util.find_spec("transformers") is not None


class math_oracle:
    """torch.func with PyTorch's math SDPA forced, the MHA fast path off and fastjac's routing off."""

    def __enter__(self):
        self.fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        self.k = sdpa_kernel(SDPBackend.MATH)
        self.k.__enter__()
        self.s = fj.config.settings(sdpa_forward_ad=False)
        self.s.__enter__()
        return self

    def __exit__(self, *exc):
        self.s.__exit__(*exc)
        self.k.__exit__(*exc)
        torch.backends.mha.set_fastpath_enabled(self.fast)


def _spectra(step, X, k=8, steps=4):
    with torch.no_grad():
        a = fj.lyapunov_spectrum(step, X, k=k, steps=steps, progress=False).exponents
        with math_oracle():
            b = fj.lyapunov_spectrum(step, X, k=k, steps=steps, progress=False).exponents
    return a, b


def _assert_same(a, b, tol=TOL):
    assert a.shape == b.shape
    assert torch.isfinite(a).all()
    assert (a - b).abs().max().item() < tol, (a - b).abs().max().item()


def _X(S=7, D=16, B=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*(() if B is None else (B,)), S, D, generator=g, dtype=D64)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_transformer_encoder_layer(norm_first, mode):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        16, 4, dim_feedforward=24, dropout=0.0, batch_first=True, norm_first=norm_first
    ).to(D64)
    getattr(layer, mode)()
    X = _X()
    a, b = _spectra(lambda x: layer(x), X)
    _assert_same(a, b)
    # without fastjac the eval-mode layer fails on its fused fast path (the issue's report)
    if mode == "eval":
        with fj.config.settings(sdpa_forward_ad=False), pytest.raises(NotImplementedError, match="forward AD"):
            with torch.no_grad():
                fj.lyapunov_spectrum(lambda x: layer(x), X, k=4, steps=1, progress=False)


def test_the_issue_call_k32_and_the_other_analysis_functions():
    """The issue's done-when call, fj.lyapunov_spectrum(lambda x: layer(x), X, k=32), and jvp / linearize /
    jacobian / finite_time_lyapunov / spectral_norm / eigvals on an nn.TransformerEncoderLayer."""
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True).to(D64).eval()
    X = _X(S=6, D=8)
    step = lambda x: layer(x)  # noqa: E731
    a, b = _spectra(step, X, k=32, steps=3)
    _assert_same(a, b)
    T = torch.randn(3, *X.shape, dtype=D64)
    with torch.no_grad():
        J = fj.jacobian(step, X)
        ft = fj.finite_time_lyapunov(step, X, horizon=3, k=4).exponents
        sn = fj.spectral_norm(step, X)
        ev = fj.eigvals(step, X, k=4)
        _, jf = fj.linearize(step, X)
        JT = fj.jvp(step, X, T)[1]
        with math_oracle():
            J0 = fj.jacobian(step, X)
            ft0 = fj.finite_time_lyapunov(step, X, horizon=3, k=4).exponents
            sn0 = fj.spectral_norm(step, X)
            ev0 = fj.eigvals(step, X, k=4)
    _assert_same(J, J0)
    _assert_same(JT, jf(T))
    _assert_same(JT.reshape(3, -1), T.reshape(3, -1) @ J0.T)
    _assert_same(ft, ft0)
    assert abs(float(sn) - float(sn0)) < 1e-8
    assert torch.allclose(ev.abs().sort().values, ev0.abs().sort().values, atol=1e-8)


def test_multihead_attention_residual_norm_step_with_masks():
    torch.manual_seed(2)
    S, D = 7, 16
    mha = nn.MultiheadAttention(D, 4, batch_first=True).to(D64).eval()
    norm = nn.LayerNorm(D).to(D64)
    kpm = torch.zeros(2, S, dtype=torch.bool)
    kpm[0, -2:] = True  # sample 0 ignores its last two tokens
    am = torch.zeros(S, S, dtype=torch.bool)
    am[0, 3] = True  # True = not allowed (nn.MultiheadAttention's boolean convention)

    def step(x):
        return norm(x + mha(x, x, x, need_weights=False, key_padding_mask=kpm, attn_mask=am)[0])

    X = _X(B=2)
    a, b = _spectra(step, X)
    _assert_same(a, b)
    # need_weights=True takes the explicit-softmax path, which torch.func already handles: the same numbers
    step_w = lambda x: norm(x + mha(x, x, x, need_weights=True, key_padding_mask=kpm, attn_mask=am)[0])  # noqa
    with torch.no_grad():
        c = fj.lyapunov_spectrum(step_w, X, k=8, steps=4, progress=False).exponents
    _assert_same(a, c)


def test_regularisers_on_a_users_module_through_autograd():
    """jacobian_frobenius / jacobian_spectral / lyapunov_penalty: values and weight gradients (reverse over
    forward through the SDPA JVP) equal the math-backend oracle's."""
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True).to(D64).train()
    X = _X(S=5, D=8, B=2)
    params = [p for p in layer.parameters()]

    def run():
        out = []
        for r in (
            R.jacobian_frobenius(layer, X, probes=3),
            R.jacobian_spectral(layer, X, iters=3),
            R.lyapunov_penalty(layer, X, horizon=2, k=3),
        ):
            g = torch.autograd.grad(r, params, allow_unused=True)
            out.append((r.detach(), [None if x is None else x.detach() for x in g]))
        return out

    ours = run()
    with math_oracle():
        ref = run()
    for (r1, g1), (r2, g2) in zip(ours, ref):
        _assert_same(r1, r2, 1e-9)
        assert [x is None for x in g1] == [x is None for x in g2]
        nonzero = 0
        for x, y in zip(g1, g2):
            if x is not None:
                _assert_same(x, y, 1e-9)
                nonzero += int(x.abs().max() > 0)
        assert nonzero >= len(params) // 2  # gradients reach the attention weights: no silent zero


def test_info_and_check_step_say_what_happens():
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, batch_first=True).to(D64)
    X = _X()
    assert "routed to fastjac.nn.functional" in fj.info(layer, X) and "1 time(s)" in fj.info(layer.eval(), X)
    with fj.config.settings(sdpa_forward_ad=False):
        assert "NOT routed" in fj.info(layer, X)
        rep = fj.check_step(layer.eval(), X)
        assert not rep.ok and "forward_ad" in rep.errors[0]
    rep = fj.check_step(layer.eval(), X)
    assert rep.ok and rep.sdpa_calls == 1 and rep.fd_rel_error < 1e-6, str(rep)
    rep = fj.check_step(layer.train(), X)  # dropout 0.1 in training mode
    assert not rep.ok and "dropout_p" in rep.errors[0] and "eval()" in rep.errors[0]
    assert any("dropout" in w for w in rep.warnings)

    @torch.jit.script
    def helper(x):
        return x * x.sum(-1, keepdim=True)

    class Scripted(nn.Module):
        def forward(self, x):
            return helper(x)

    assert any("TorchScript" in w for w in fj.check_step(Scripted(), X).warnings)

    class Lossy(nn.Module):  # a float64 step that computes in float32 inside
        def forward(self, x):
            return torch.tanh(x.float()).double()

    rep = fj.check_step(Lossy(), X)
    assert any("torch.float32 inside" in w for w in rep.warnings)

    class Detaching(nn.Module):  # silently wrong tangents: caught by the finite-difference check
        def forward(self, x):
            return torch.tanh(x) + x.detach() ** 2

    rep = fj.check_step(Detaching(), X)
    assert any("finite differences" in w for w in rep.warnings), str(rep)
    rep = fj.check_step(lambda x: (x, x), X)
    assert "as_step" in rep.errors[0]
    with pytest.raises(TypeError, match="X"):
        fj.check_step(layer, X.numpy())


def test_as_step_binds_arguments_selects_and_states_trivial():
    mha = nn.MultiheadAttention(16, 2, batch_first=True).to(D64).eval()
    kpm = torch.zeros(1, 7, dtype=torch.bool)
    kpm[0, 0] = True
    step = fj.as_step(lambda x, **kw: mha(x, x, x, **kw), need_weights=False, key_padding_mask=kpm)
    X = _X()
    assert step(X).shape == X.shape
    assert fj.as_step(nn.TransformerEncoderLayer(16, 2, batch_first=True)).trivial_count(7, 16) == 14
    assert fj.as_step(nn.TransformerEncoderLayer(16, 2, batch_first=True, norm_first=True)).trivial_count(7, 16) == 0
    with pytest.raises(ValueError, match="trivial_per_token"):
        fj.as_step(mha, trivial_per_token=-1)
    with pytest.raises(TypeError, match="module"):
        fj.as_step(3)


# ----------------------------------------------------------------------------------------------------------------
# HuggingFace transformers (small configs, no download)
# ----------------------------------------------------------------------------------------------------------------

needs_tf = pytest.mark.skipif(not HAS_TF, reason="transformers is not installed (pip install -e '.[thirdparty]')")


def _bert(impl):
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    cfg = BertConfig(
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=24,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation=impl,
    )
    torch.manual_seed(4)
    return BertLayer(cfg).to(D64).eval()


def _llama(impl, S):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(
        hidden_size=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        intermediate_size=24,
        attn_implementation=impl,
    )
    torch.manual_seed(5)
    layer = LlamaDecoderLayer(cfg, layer_idx=0).to(D64).eval()
    # LlamaRMSNorm computes in float32 whatever the input (fj.check_step warns about it); a float64 oracle
    # comparison needs float64 norms: the same maths as torch.nn.RMSNorm
    for name in ("input_layernorm", "post_attention_layernorm"):
        old = getattr(layer, name)
        new = nn.RMSNorm(16, eps=old.variance_epsilon).to(D64)
        new.weight.data.copy_(old.weight.data)
        setattr(layer, name, new)
    pos = LlamaRotaryEmbedding(cfg)(torch.zeros(1, S, 16, dtype=D64), torch.arange(S)[None])
    causal = torch.ones(S, S, dtype=torch.bool).tril()[None, None]
    return layer, pos, causal


@needs_tf
@pytest.mark.parametrize("impl", ["sdpa", "fastjac"])
def test_hf_bert_and_llama_layers(impl):
    if impl == "fastjac":
        import fastjac.integrations.transformers as fjt

        assert fjt.register() == "fastjac"
    S = 7
    X = _X(S=S)
    bert = fj.as_step(_bert(impl))
    assert bert.trivial_count(S, 16) == 2 * S
    llama, pos, causal = _llama(impl, S)
    lstep = fj.as_step(llama, attention_mask=causal, position_embeddings=pos)
    for step in (bert, lstep):
        a, b = _spectra(step, X, k=8, steps=3)
        _assert_same(a, b)
    assert fj.check_step(lstep, X).ok
    if impl == "fastjac":  # registered: plain torch.func works with no context manager
        J = torch.func.jacfwd(bert)(X)
        with math_oracle():
            J0 = torch.func.jacrev(bert)(X)
        _assert_same(J, J0)


@needs_tf
def test_hf_llama_rmsnorm_float32_trap_is_reported():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(
        hidden_size=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        intermediate_size=24,
        attn_implementation="sdpa",
    )
    layer = LlamaDecoderLayer(cfg, layer_idx=0).to(D64).eval()
    pos = LlamaRotaryEmbedding(cfg)(torch.zeros(1, 5, 16, dtype=D64), torch.arange(5)[None])
    rep = fj.check_step(fj.as_step(layer, position_embeddings=pos), _X(S=5))
    assert any("torch.float32 inside" in w for w in rep.warnings), str(rep)
