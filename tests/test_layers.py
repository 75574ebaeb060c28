import torch
from torch import nn

from imagetx.model.layers import residual_dropout_layer_norm


def test_memory_lean_residual_layer_norm_matches_autograd():
    torch.manual_seed(0)
    d = 16
    norm = nn.LayerNorm(d).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    x = torch.randn(3, 5, d, dtype=torch.float64, requires_grad=True)
    f = torch.randn(3, 5, d, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(3, 5, d, dtype=torch.float64)
    for p in (0.0, 0.3):
        torch.manual_seed(1)
        y = residual_dropout_layer_norm(x, f, norm, p, training=True)
        grads = torch.autograd.grad(y, (x, f, norm.weight, norm.bias), gy)
        keep = y.new_ones(y.shape, dtype=torch.bool)
        if p:
            torch.manual_seed(1)
            keep = torch.rand_like(f) >= p
        ref = norm(x + f * keep / (1 - p))
        ref_grads = torch.autograd.grad(ref, (x, f, norm.weight, norm.bias), gy)
        torch.testing.assert_close(y, ref)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b)
    # evaluation: plain LayerNorm(x + f)
    y = residual_dropout_layer_norm(x, f, norm, 0.3, training=False)
    torch.testing.assert_close(y, norm(x + f))
