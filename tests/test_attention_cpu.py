"""The CPU accelerators are checked against the private ATen signatures they call, and off cleanly without them."""

import torch

from lenx import attention_cpu
from lenx.attention import causal_attention, recording

from .conftest import tiny_model


def test_the_private_kernels_are_found_with_the_signatures_the_routes_were_written_for():
    assert attention_cpu._CPU_FLASH is not None and attention_cpu._CPU_FLASH_BACKWARD is not None
    qkv = attention_cpu._QKV
    # a changed signature (another argument order, type or number of outputs) turns the kernel off
    assert attention_cpu._kernel("_scaled_dot_product_flash_attention_for_cpu", qkv[::-1], returns=2) is None
    assert attention_cpu._kernel("_scaled_dot_product_flash_attention_for_cpu", qkv, returns=3) is None
    assert attention_cpu._kernel("_scaled_dot_product_flash_attention_for_cpu",
                                 [*qkv, ("dropout_p", "int")], returns=2) is None
    assert attention_cpu._kernel("no_such_kernel_in_aten", qkv, returns=2) is None


def test_without_the_kernels_every_bias_takes_a_core_route_with_the_same_numbers(monkeypatch):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 100, 8) for _ in range(3))
    for pe in ("alibi", "shaw", "fox"):
        model = tiny_model(pe)
        x = torch.randn(1, 100, 32)
        with torch.no_grad():
            bias = model.pe.bias(0, torch.arange(100), x=x, q=q, k=k)
            want = causal_attention(q, k, v, bias, "materialized")
            with recording() as fast:
                got_fast = causal_attention(q, k, v, bias, "sdpa", 32)
            monkeypatch.setattr(attention_cpu, "_CPU_FLASH", None)
            monkeypatch.setattr(attention_cpu, "_CPU_FLASH_BACKWARD", None)
            with recording() as plain:
                got_plain = causal_attention(q, k, v, bias, "sdpa", 32)
            monkeypatch.undo()
        assert fast in ({"separable"}, {"clipped"}) and plain == {"blocked"}, (pe, fast, plain)
        torch.testing.assert_close(got_fast, want, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got_plain, want, atol=2e-5, rtol=1e-4)


def test_alibi_trains_on_the_stored_route_at_gapped_positions_as_the_reference():
    """Gapped positions give ALiBi no distance table; the stored route then adds its key term (integer positions
    times float slopes) per column, with the reference's numbers and gradients."""
    torch.manual_seed(1)
    pos = torch.arange(0, 96, 3)
    bias = tiny_model("alibi").pe.bias(0, pos)
    assert bias.toeplitz_table() is None
    grads = {}
    for backend in ("materialized", "sdpa"):
        q, k, v = (torch.randn(1, 4, 32, 8, generator=torch.Generator().manual_seed(i)).requires_grad_()
                   for i in range(3))
        with recording() as routes:
            out = causal_attention(q, k, v, bias, backend)
        out.square().sum().backward()
        grads[backend] = (out.detach(), q.grad, k.grad, v.grad)
        assert backend == "materialized" or routes == {"stored"}
    for got, want in zip(grads["sdpa"], grads["materialized"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
