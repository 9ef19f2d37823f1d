"""The CPU inference paths, each forced on whatever CPU runs the tests, so that no path is tested only on the CPUs
that happen to take it:

- oneDNN's fused linear (`modeling_hf_vit.linear`, inference without gradients on any x86 CPU) with the GELU in its
  epilogue (AVX-512 CPUs: AMD Zen 4/5, Intel Skylake-SP and later) or after it (AVX2 only: AMD Zen 2);
- bf16 linears in oneDNN where the CPU runs them (AVX512-BF16 or AMX: Zen 4/5, Intel Cooper Lake, Sapphire Rapids)
  and through nn.Linear elsewhere (Zen 2);
- freeze_for_cpu_inference (every Linear's weight kept only pre-packed for oneDNN: the same logits, the plain weights
  back from state_dict, no way to train it, load weights into it, cast or deepcopy it by mistake), in fp32 anywhere
  and bf16 where oneDNN runs it; where it does not, the refusal is forced.
"""

import copy

import pytest
import torch
from conftest import randomize_, tiny_config
from torch import nn

from hf_vit import VisionTransformerForImageClassification, modeling_hf_vit
from hf_vit.modeling_hf_vit import FrozenLinear


pytestmark = pytest.mark.skipif(modeling_hf_vit._ONEDNN_LINEAR is None, reason="torch built without oneDNN")
DTYPES = [torch.float32] + ([torch.bfloat16] if modeling_hf_vit._ONEDNN_BF16 else [])


# --- the eager path: oneDNN's linear without gradients --------------------------------------------------------------


@pytest.mark.parametrize("fuse_activation", [True, False], ids=["gelu-fused", "gelu-after"])
@pytest.mark.parametrize("hidden_act", ["gelu_pytorch_tanh", "gelu"])
def test_onednn_inference_matches_the_autograd_path(monkeypatch, pixel_values, hidden_act, fuse_activation):
    model = randomize_(VisionTransformerForImageClassification(tiny_config(hidden_act=hidden_act))).eval()
    reference = model(pixel_values).logits.detach()  # gradients on: nn.Linear and ACT2FN
    calls = []
    onednn = modeling_hf_vit._ONEDNN_LINEAR
    monkeypatch.setattr(modeling_hf_vit, "_ONEDNN_LINEAR", lambda *args: calls.append(args[3]) or onednn(*args))
    # Fused on AVX-512 CPUs, after the matmul on the others: both paths run here whatever this CPU has.
    monkeypatch.setattr(modeling_hf_vit, "_ONEDNN_FUSES_ACTIVATION", fuse_activation)
    with torch.no_grad():
        logits = model(pixel_values).logits
    assert calls.count("gelu") == (2 if fuse_activation else 0) and len(calls) == 2 * 6  # q, k, v, out, fc1, fc2
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("onednn_bf16", [True, False], ids=["bf16-onednn", "bf16-nn-linear"])
def test_bf16_inference_goes_to_onednn_only_where_the_cpu_runs_it(monkeypatch, pixel_values, onednn_bf16):
    """The gate is forced both ways; the oneDNN bf16 kernels themselves need AVX512-BF16 or AMX, so that half is
    skipped on an AVX2-only CPU (which then takes the nn.Linear half, as it would in use)."""
    if onednn_bf16 and not modeling_hf_vit._ONEDNN_BF16:
        pytest.skip("this CPU has no oneDNN bf16 kernels (no AVX512-BF16 or AMX): the nn.Linear half covers it")
    dtypes = (torch.float32, torch.bfloat16) if onednn_bf16 else (torch.float32,)
    monkeypatch.setattr(modeling_hf_vit, "_ONEDNN_DTYPES", dtypes)
    model = model_in(torch.bfloat16)
    pixel_values = pixel_values.to(torch.bfloat16)
    reference = model(pixel_values).logits.detach().float()  # gradients on: nn.Linear
    calls = []
    onednn = modeling_hf_vit._ONEDNN_LINEAR
    monkeypatch.setattr(modeling_hf_vit, "_ONEDNN_LINEAR", lambda *args: calls.append(args[3]) or onednn(*args))
    with torch.no_grad():
        logits = model(pixel_values).logits.float()
    assert len(calls) == (2 * 6 if onednn_bf16 else 0)
    torch.testing.assert_close(logits, reference, atol=0.05, rtol=0.05)  # bf16 rounding, other summation orders


def test_onednn_path_leaves_hooked_and_autocast_layers_to_their_forward(pixel_values):
    model = randomize_(VisionTransformerForImageClassification(tiny_config())).eval()
    seen = []
    model.transformer.encoder.layer[0].ffn.fc1.register_forward_hook(lambda module, args, output: seen.append(1))
    with torch.no_grad():
        model(pixel_values)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(pixel_values).logits
    assert len(seen) == 2
    assert logits.dtype == torch.bfloat16


# --- freeze_for_cpu_inference -----------------------------------------------------------------------------------------


def model_in(dtype: torch.dtype, **config) -> VisionTransformerForImageClassification:
    return randomize_(VisionTransformerForImageClassification(tiny_config(**config))).to(dtype).eval()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fuse_activation", [True, False], ids=["gelu-fused", "gelu-after"])
def test_frozen_model_gives_the_plain_forwards_logits(monkeypatch, pixel_values, dtype, fuse_activation):
    # The GELU goes into fc1's epilogue on AVX-512 CPUs and after it elsewhere: both run here whatever this CPU has.
    monkeypatch.setattr(modeling_hf_vit, "_ONEDNN_FUSES_ACTIVATION", fuse_activation)
    model = model_in(dtype)
    pixel_values = pixel_values.to(dtype)
    with torch.inference_mode():
        reference = model(pixel_values).logits
    model.freeze_for_cpu_inference()
    assert not any(type(module) is nn.Linear for module in model.modules())
    assert sum(type(module) is FrozenLinear for module in model.modules()) == 2 * 6 + 1  # q, k, v, out, fc1, fc2; head
    packed = []
    onednn = modeling_hf_vit._ONEDNN_LINEAR
    monkeypatch.setattr(
        modeling_hf_vit, "_ONEDNN_LINEAR", lambda *args: packed.append(args[1].is_mkldnn) or onednn(*args)
    )
    with torch.inference_mode():
        logits = model(pixel_values).logits
    assert packed == [True] * 13
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # the same kernels; bf16 may accumulate in another order
    torch.testing.assert_close(logits, reference, atol=tolerance, rtol=0)


def test_state_dict_gives_the_plain_weights_back_and_a_saved_frozen_model_loads(tmp_path, pixel_values):
    model = model_in(torch.float32)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    model.freeze_for_cpu_inference()
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[key], before[key]) for key in before)
    model.save_pretrained(tmp_path)
    loaded = VisionTransformerForImageClassification.from_pretrained(tmp_path).eval()
    with torch.inference_mode():
        torch.testing.assert_close(loaded(pixel_values).logits, model(pixel_values).logits, atol=1e-6, rtol=0)


def test_frozen_model_holds_one_copy_of_each_weight_so_none_can_go_stale():
    model = model_in(torch.float32)
    linear_weights = sum(module.weight.numel() for module in model.modules() if type(module) is nn.Linear)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    model.freeze_for_cpu_inference()
    # No plain weight is left to change behind the packed one's back (a p.data.copy_() no version counter sees).
    assert sum(parameter.numel() for parameter in model.parameters()) == parameters - linear_weights


@pytest.mark.parametrize("strict", [True, False])
def test_loading_weights_into_a_frozen_model_is_refused_before_anything_changes(pixel_values, strict):
    # strict=False used to load the biases and keep the old packed weights: logits off, silently.
    model = model_in(torch.float32).freeze_for_cpu_inference()
    with torch.inference_mode():
        before = model(pixel_values).logits
    other = model_in(torch.float32).state_dict()
    with pytest.raises(RuntimeError, match=r"^This model was frozen for CPU inference: load the weights into an "):
        model.load_state_dict(other, strict=strict)
    with torch.inference_mode():
        torch.testing.assert_close(model(pixel_values).logits, before, atol=0, rtol=0)  # nothing was loaded
    with pytest.raises(RuntimeError, match="^This model was frozen for CPU inference"):  # nor into a part of it
        model.transformer.encoder.layer[0].attn.load_state_dict(
            {key.removeprefix("transformer.encoder.layer.0.attn."): value for key, value in other.items()},
            strict=False,
        )


def test_casting_or_copying_a_frozen_model_is_one_clear_error_and_changes_nothing(pixel_values):
    model = model_in(torch.float32).freeze_for_cpu_inference()
    with torch.inference_mode():
        before = model(pixel_values).logits
    for cast in (lambda: model.to(torch.bfloat16), lambda: model.half(), lambda: model.to("meta")):
        # These used to fail inside the first FrozenLinear, with the modules before it already cast.
        with pytest.raises(RuntimeError, match=r"^This model was frozen for CPU inference: cast it before "):
            cast()
        assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}
        assert {buffer.device.type for buffer in model.buffers()} == {"cpu"}
    assert model.to("cpu", torch.float32) is model and model.float() is model  # casts that change nothing still do
    with pytest.raises(RuntimeError, match=r"^This model was frozen for CPU inference: deepcopy it before "):
        copy.deepcopy(model)
    with torch.inference_mode():
        torch.testing.assert_close(model(pixel_values).logits, before, atol=0, rtol=0)


def test_frozen_model_refuses_gradients_and_inputs_of_another_dtype(pixel_values):
    model = model_in(torch.float32).freeze_for_cpu_inference()
    with pytest.raises(RuntimeError, match="frozen for CPU inference .* with gradients on: run it under"):
        model(pixel_values)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="got a torch.float64 input"):
        model.transformer.encoder.layer[0].attn.query(torch.randn(2, 32, dtype=torch.float64))


def test_hooked_linears_keep_their_forward(pixel_values):
    model = model_in(torch.float32)
    seen = []
    model.transformer.encoder.layer[0].ffn.fc1.register_forward_hook(lambda module, args, output: seen.append(1))
    model.freeze_for_cpu_inference()
    assert type(model.transformer.encoder.layer[0].ffn.fc1) is nn.Linear
    with torch.inference_mode():
        model(pixel_values)
    assert seen == [1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_a_dtype_onednn_cannot_run_here_is_one_clear_error(monkeypatch, dtype):
    monkeypatch.setattr(modeling_hf_vit, "_ONEDNN_DTYPES", (torch.float32,))  # as on a CPU without AVX512-BF16
    model = model_in(dtype)
    with pytest.raises(ValueError, match=rf"in torch.float32 on this machine; the model is {dtype} on cpu\.$"):
        model.freeze_for_cpu_inference()
    assert any(type(module) is nn.Linear for module in model.modules())  # left as it was
