"""How the tests compare what datainf computes with an independent reference, and why the bounds hold.

Float64 (the default): the model, the batch and the reference run in float64, so a correct implementation
differs from the reference only by rounding: about 1.1e-16 per operation, times the number of terms a value
accumulates (under 1e4 in the tiny models of these tests, plus the conditioning of a damped solve for the
scores). ``FLOAT64_TOL = 1e-9`` relative to the reference's largest entry therefore holds on any CPU and any
thread count, while every real error these tests exist for (a dropped term or timestep, a wrong sign, a
padding position that leaks, the wrong loss) is at least 1e-3 of the largest entry.

Float32 (where a test must exercise the float32 path itself): float32 rounds at 6e-8 per operation; with
under 1e4 accumulated terms per value the worst-case error is 6e-4 of the largest entry and the typical one
far smaller, so ``FLOAT32_TOL = 1e-3`` holds with margin and still catches any O(1e-2) error.

A reference entry that is zero in exact arithmetic (the query projection's LoRA gradient over a one-token
sequence, say) is compared against the example's largest gradient entry over all blocks, never relative to
its own rounding noise.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

FLOAT64_TOL = 1e-9
FLOAT32_TOL = 1e-3


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference, |actual - expected|_max, computed in float64."""
    return float((actual.double() - expected.double()).abs().max())


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, tol: float = FLOAT64_TOL, what: str = "") -> None:
    """``max |actual - expected| <= tol * max |expected|`` (same shape required)."""
    assert actual.shape == expected.shape, (what, tuple(actual.shape), tuple(expected.shape))
    scale = float(expected.double().abs().max())
    assert scale > 0, f"{what}: the reference is all zero, so the comparison could not fail"
    err = max_error(actual, expected)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} x max |reference| {scale:.3g}"


def assert_per_example_close(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                             tol: float = FLOAT64_TOL) -> None:
    """Per-example gradients {block: (B, *shape)}: the same blocks, and for every example i and block,
    ``max |actual[b][i] - expected[b][i]| <= tol * (largest |expected[*][i]| over all blocks)``."""
    assert list(actual) == list(expected), (list(actual), list(expected))
    size = next(iter(expected.values())).shape[0]
    for i in range(size):
        scale = max(float(e[i].double().abs().max()) for e in expected.values())
        assert scale > 0, f"example {i}: every reference gradient is zero, so the comparison could not fail"
        for name, e in expected.items():
            a = actual[name]
            assert a.shape == e.shape, (name, tuple(a.shape), tuple(e.shape))
            err = max_error(a[i], e[i])
            assert err <= tol * scale, f"{name}, example {i}: max error {err:.3g} > {tol:g} x {scale:.3g}"


def random_b_lora(model_dir) -> torch.nn.Module:
    """The tiny Llama of ``model_dir`` in float64 with a LoRA (r=2, alpha 4, no dropout) on q_proj and v_proj whose
    B matrices are random (PEFT starts them at 0, where the A blocks have no gradient), in eval mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return model.eval()
