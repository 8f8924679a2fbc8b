"""The same computation, spelled the many ways PyTorch allows, maps to the same rule and kernel family."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fact_ray.capture import LoadedModel, capture
from fact_ray.discover import discover


def found(module: nn.Module, *inputs: torch.Tensor):
    captured = capture(LoadedModel(module.eval(), tuple(inputs), type(module).__name__, "test"))
    assert captured.method == "export"
    return discover(captured.graph, "sm90", "fp32")


def summary(matches) -> list[tuple[str, str]]:
    return sorted((m.rule, m.family) for m in matches)


# ------------------------------------------------------------------------------------------------ activations


class LinearThen(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.act = act

    def forward(self, x):
        return self.act(self.fc(x))


def _gelu_tanh_gpt2(h):
    return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))


def _gelu_tanh_reassociated(h):
    return h * (0.5 * (1 + torch.tanh(0.7978845608028654 * (h + 0.044715 * h * h * h))))


def _gelu_exact_written(h):
    return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))


@pytest.mark.parametrize("act, kind", [
    (nn.GELU(), "gelu"),
    (nn.GELU(approximate="tanh"), "gelu_tanh"),
    (lambda h: F.gelu(h, approximate="tanh"), "gelu_tanh"),
    (_gelu_tanh_gpt2, "gelu_tanh"),
    (_gelu_tanh_reassociated, "gelu_tanh"),
    (_gelu_exact_written, "gelu"),
    (nn.ReLU(), "relu"),
    (torch.relu, "relu"),
    (nn.SiLU(), "silu"),
    (lambda h: h * torch.sigmoid(h), "silu"),
], ids=["nn.GELU", "nn.GELU-tanh", "F.gelu-tanh", "gelu-tanh-formula", "gelu-tanh-reassociated",
        "gelu-erf-formula", "nn.ReLU", "torch.relu", "nn.SiLU", "x*sigmoid(x)"])
def test_linear_bias_activation(act, kind):
    matches = found(LinearThen(act), torch.randn(4, 16))
    assert summary(matches) == [("linear_bias_act", "gemm_bias_act")]
    m = matches[0]
    assert m.param("activation") == kind and m.param("has_bias") is True
    assert (m.param("M"), m.param("N"), m.param("K")) == (4, 32, 16)
    assert m.anchor == m.nodes[-1] and len(m.nodes) >= 2  # the linear and its activation region, one match


def test_unknown_activation_is_not_fused():
    matches = found(LinearThen(torch.tanh), torch.randn(4, 16))
    assert summary(matches) == [("linear_bias", "gemm_bias")]


def test_activation_whose_input_is_also_used_elsewhere_is_not_fused():
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 32)

        def forward(self, x):
            h = self.fc(x)
            return torch.relu(h) + h

    assert summary(found(Both(), torch.randn(4, 16))) == [("linear_bias", "gemm_bias")]


# ------------------------------------------------------------------------------------------------ GEMMs


class Mm(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.w = nn.Parameter(torch.randn(32, 16))
        self.b = nn.Parameter(torch.randn(32))

    def forward(self, x, y=None):
        how = self.how
        if how == "torch.matmul":
            return torch.matmul(x, y)
        if how == "@":
            return x @ y
        if how == "torch.bmm":
            return torch.bmm(x, y)
        if how == "x @ w.t()":
            return x @ self.w.t()
        if how == "F.linear":
            return F.linear(x, self.w)
        if how == "mm + bias":
            return torch.mm(x, self.w.t()) + self.b
        if how == "addmm":
            return torch.addmm(self.b, x, self.w.t())
        if how == "F.linear + bias":
            return F.linear(x, self.w, self.b)
        if how == "linear + residual":
            return F.linear(x, self.w, self.b) + y
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["torch.matmul", "@"])
def test_2d_matmul_spellings_are_one_gemm_with_row_major_b(how):
    matches = found(Mm(how), torch.randn(8, 16), torch.randn(16, 24))
    assert summary(matches) == [("matmul", "gemm")]
    m = matches[0]
    assert (m.param("M"), m.param("N"), m.param("K"), m.param("L")) == (8, 24, 16, 1)
    assert m.param("layout_b") == "row" and m.param("layout_a") == "row" and m.param("has_bias") is False


@pytest.mark.parametrize("how", ["torch.matmul", "@", "torch.bmm"])
def test_batched_spellings_are_one_bmm(how):
    matches = found(Mm(how), torch.randn(3, 8, 16), torch.randn(3, 16, 24))
    assert summary(matches) == [("batched_matmul", "bmm")]
    m = matches[0]
    assert (m.param("M"), m.param("N"), m.param("K"), m.param("L")) == (8, 24, 16, 3)
    assert m.param("broadcast_b") is False


def test_4d_matmul_is_bmm_over_both_batch_dims():
    m = found(Mm("@"), torch.randn(2, 3, 8, 16), torch.randn(2, 3, 16, 24))[0]
    assert m.family == "bmm" and m.param("L") == 6 and m.param("M") == 8


def test_broadcast_b_and_flattened_rows():
    m = found(Mm("@"), torch.randn(3, 8, 16), torch.randn(1, 16, 24))[0]
    assert m.family == "bmm" and m.param("L") == 3 and m.param("broadcast_b") is True
    m = found(Mm("@"), torch.randn(3, 8, 16), torch.randn(16, 24))[0]  # one GEMM over 3*8 rows
    assert m.family == "gemm" and (m.param("M"), m.param("L")) == (24, 1)


@pytest.mark.parametrize("how", ["x @ w.t()", "F.linear"])
def test_gemm_with_linear_weight_is_col_layout_on_the_parameter(how):
    matches = found(Mm(how), torch.randn(8, 16))
    assert summary(matches) == [("matmul", "gemm")]
    m = matches[0]
    assert m.param("layout_b") == "col" and dict(m.param("operands"))["b"] == "p_w"
    assert (m.param("M"), m.param("N"), m.param("K")) == (8, 32, 16)


@pytest.mark.parametrize("how", ["mm + bias", "addmm", "F.linear + bias"])
def test_bias_spellings_are_gemm_bias(how):
    matches = found(Mm(how), torch.randn(8, 16))
    assert summary(matches) == [("linear_bias", "gemm_bias")]
    m = matches[0]
    ops = dict(m.param("operands"))
    assert m.param("has_bias") and ops["bias"] == "p_b" and ops["b"] == "p_w" and m.param("layout_b") == "col"


def test_linear_bias_residual():
    matches = found(Mm("linear + residual"), torch.randn(8, 16), torch.randn(8, 32))
    assert summary(matches) == [("linear_bias_residual", "gemm_bias_residual")]
    m = matches[0]
    assert m.param("residual") is True and dict(m.param("operands"))["residual"] == "y"


# ------------------------------------------------------------------------------------------------ attention


class Attention(nn.Module):
    def __init__(self, how, qkv_split="split", seq=8):
        super().__init__()
        self.how, self.qkv_split = how, qkv_split
        self.qkv = nn.Linear(32, 96)
        self.register_buffer("tril", torch.tril(torch.ones(seq, seq)).view(1, 1, seq, seq))
        g = torch.Generator().manual_seed(0)
        self.register_buffer("random_mask", torch.rand(1, 1, seq, seq, generator=g) > 0.5)

    def forward(self, x):
        B, T, C = x.shape
        h = self.qkv(x)
        q, k, v = h.split(C, dim=2) if self.qkv_split == "split" else h.chunk(3, dim=-1)
        q, k, v = (t.view(B, T, 4, C // 4).transpose(1, 2) for t in (q, k, v))
        if self.how == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            if self.how == "masked_fill":
                att = att.masked_fill(self.tril[:, :, :T, :T] == 0, float("-inf"))
            elif self.how == "where":
                att = torch.where(self.tril[:, :, :T, :T].bool(), att, float("-inf"))
            elif self.how == "additive":
                att = att + torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
            elif self.how == "arange":
                i = torch.arange(T)
                att = att.masked_fill(i[None, :] > i[:, None], float("-inf"))
            elif self.how == "random":
                att = att.masked_fill(self.random_mask, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        return y.transpose(1, 2).reshape(B, T, C)


@pytest.mark.parametrize("how", ["sdpa", "masked_fill", "where", "additive", "arange"])
@pytest.mark.parametrize("qkv_split", ["split", "chunk"])
def test_causal_attention_spellings(how, qkv_split):
    matches = found(Attention(how, qkv_split), torch.randn(2, 8, 32))
    assert summary(matches) == [("attention", "attention"), ("linear_bias", "gemm_bias")]
    att = next(m for m in matches if m.family == "attention")
    assert att.param("causal") is True
    assert (att.param("B"), att.param("H"), att.param("S"), att.param("D")) == (2, 4, 8, 8)
    assert att.param("scale") == pytest.approx(1 / math.sqrt(8))
    assert att.param("spelling") == ("sdpa" if how == "sdpa" else "explicit")
    assert set(dict(att.param("operands"))) == {"q", "k", "v"}


def test_non_causal_mask_is_not_attention():
    matches = found(Attention("random"), torch.randn(2, 8, 32))
    assert summary(matches) == [("batched_matmul", "bmm"), ("batched_matmul", "bmm"), ("linear_bias", "gemm_bias")]


# ------------------------------------------------------------------------------------------------ norms, SwiGLU


class RMS(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.weight = nn.Parameter(torch.ones(16))
        self.norm = nn.RMSNorm(16, eps=1e-6)

    def forward(self, x):
        if self.how == "rsqrt":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight
        if self.how == "div-sqrt":
            return self.weight * (x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + 1e-6))
        if self.how == "llama":
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).type_as(x) * self.weight
        return self.norm(x)


@pytest.mark.parametrize("how", ["rsqrt", "div-sqrt", "llama", "nn.RMSNorm"])
def test_rmsnorm_spellings(how):
    matches = found(RMS(how), torch.randn(3, 5, 16))
    assert summary(matches) == [("rmsnorm", "rmsnorm")]
    m = matches[0]
    assert (m.param("rows"), m.param("cols"), m.param("affine")) == (15, 16, True)
    assert m.param("eps") == pytest.approx(1e-6)


def test_layernorm():
    matches = found(nn.LayerNorm(16, eps=1e-3), torch.randn(3, 5, 16))
    assert summary(matches) == [("layernorm", "layernorm")]
    assert (matches[0].param("rows"), matches[0].param("eps"), matches[0].param("affine")) == (15, 1e-3, True)


class SwiGLU(nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.w1, self.w3 = nn.Linear(16, 40, bias=bias), nn.Linear(16, 40, bias=bias)
        self.w2 = nn.Linear(40, 16, bias=bias)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu(bias):
    matches = found(SwiGLU(bias), torch.randn(6, 16))
    down = ("linear_bias", "gemm_bias") if bias else ("matmul", "gemm")
    assert summary(matches) == sorted([("swiglu", "swiglu"), down])
    sw = next(m for m in matches if m.family == "swiglu")
    ops = dict(sw.param("operands"))
    assert ops["a"] == "x" and ops["b_gate"] == "p_w1_weight" and ops["b_up"] == "p_w3_weight"
    assert (sw.param("M"), sw.param("N"), sw.param("K"), sw.param("has_bias")) == (6, 40, 16, bias)
