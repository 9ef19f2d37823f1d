"""The PyTorch model: shapes, the seed's key layout and logits, attention implementations, errors, training paths."""

import math
import unittest.mock

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from conftest import randomize_, tiny_config

from hf_vit import VisionTransformerConfig, VisionTransformerForImageClassification, VisionTransformerModel
from hf_vit.modeling_hf_vit import resample_position_embeddings


def classifier(seed: int = 0, **overrides) -> VisionTransformerForImageClassification:
    return randomize_(VisionTransformerForImageClassification(tiny_config(**overrides)), seed).eval()


# -- shapes ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, sequence_length, head_in",
    [
        (dict(classifier="token"), 17, 32),
        (dict(classifier="gap"), 16, 32),
        (dict(classifier="token", representation_size=24), 17, 24),
    ],
)
def test_output_shapes(overrides, sequence_length, head_in, pixel_values):
    model = classifier(**overrides)
    outputs = model(pixel_values, output_hidden_states=True, output_attentions=True)
    assert outputs.logits.shape == (2, 10)
    assert model.head.in_features == head_in
    assert len(outputs.hidden_states) == 3 and outputs.hidden_states[0].shape == (2, sequence_length, 32)
    assert len(outputs.attentions) == 2 and outputs.attentions[0].shape == (2, 4, sequence_length, sequence_length)
    base = model.transformer(pixel_values)
    assert base.last_hidden_state.shape == (2, sequence_length, 32) and base.pooler_output.shape == (2, 32)


def test_gap_has_no_class_token_and_pools_the_mean(pixel_values):
    model = classifier(classifier="gap")
    assert model.transformer.embeddings.cls_token is None
    assert "transformer.embeddings.cls_token" not in model.state_dict()
    outputs = model.transformer(pixel_values)
    torch.testing.assert_close(outputs.pooler_output, outputs.last_hidden_state.mean(dim=1))


def test_token_pools_row_zero_after_encoder_norm(pixel_values):
    outputs = classifier().transformer(pixel_values)
    torch.testing.assert_close(outputs.pooler_output, outputs.last_hidden_state[:, 0])


def test_pre_logits_is_linear_then_tanh(pixel_values):
    model = classifier(representation_size=24)
    pooled = model.transformer(pixel_values).pooler_output
    expected = F.linear(
        torch.tanh(F.linear(pooled, model.pre_logits.weight, model.pre_logits.bias)), model.head.weight
    )
    torch.testing.assert_close(model(pixel_values).logits, expected + model.head.bias)


def test_fresh_head_and_class_token_are_zero_as_in_the_paper():
    model = VisionTransformerForImageClassification(tiny_config())
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert torch.count_nonzero(model.transformer.embeddings.cls_token) == 0
    assert model.transformer.embeddings.position_embeddings.std() > 0.01
    assert model.transformer.encoder.layer[0].attn.query.weight.std() > 0.01


# -- the seed repo's layout and numbers ------------------------------------------------------------------------------


def seed_keys(num_layers: int) -> list[str]:
    """The state-dict keys of jeonsworld/ViT-pytorch's VisionTransformer (../shared/NPZ.md)."""
    keys = [
        "transformer.embeddings.position_embeddings",
        "transformer.embeddings.cls_token",
        "transformer.embeddings.patch_embeddings.weight",
        "transformer.embeddings.patch_embeddings.bias",
    ]
    for i in range(num_layers):
        layer = f"transformer.encoder.layer.{i}"
        keys += [f"{layer}.{norm}.{p}" for norm in ("attention_norm", "ffn_norm") for p in ("weight", "bias")]
        keys += [f"{layer}.ffn.{fc}.{p}" for fc in ("fc1", "fc2") for p in ("weight", "bias")]
        keys += [f"{layer}.attn.{proj}.{p}" for proj in ("query", "key", "value", "out") for p in ("weight", "bias")]
    return (
        keys
        + ["transformer.encoder.encoder_norm.weight", "transformer.encoder.encoder_norm.bias"]
        + [
            "head.weight",
            "head.bias",
        ]
    )


def test_vit_b16_has_the_seed_keys_and_86_567_656_parameters():
    with torch.device("meta"):
        model = VisionTransformerForImageClassification(VisionTransformerConfig(num_labels=1000))
    state_dict = model.state_dict()
    assert sorted(state_dict) == sorted(seed_keys(12))
    assert sum(p.numel() for p in model.parameters()) == 86_567_656
    assert state_dict["transformer.embeddings.position_embeddings"].shape == (1, 197, 768)
    assert state_dict["transformer.encoder.layer.0.ffn.fc1.weight"].shape == (3072, 768)


def seed_state_dict(config: VisionTransformerConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with the keys and shapes a seed-repo `*_checkpoint.bin` has."""
    D, M, P, C = config.hidden_size, config.intermediate_size, config.patch_size, config.num_labels
    N = config.grid_size[0] * config.grid_size[1]
    shapes = {
        "transformer.embeddings.position_embeddings": (1, N + 1, D),
        "transformer.embeddings.cls_token": (1, 1, D),
        "transformer.embeddings.patch_embeddings.weight": (D, 3, P, P),
        "transformer.embeddings.patch_embeddings.bias": (D,),
        "transformer.encoder.encoder_norm.weight": (D,),
        "transformer.encoder.encoder_norm.bias": (D,),
        "head.weight": (C, D),
        "head.bias": (C,),
    }
    for i in range(config.num_hidden_layers):
        layer = f"transformer.encoder.layer.{i}"
        for name in ("attention_norm", "ffn_norm"):
            shapes |= {f"{layer}.{name}.weight": (D,), f"{layer}.{name}.bias": (D,)}
        shapes |= {f"{layer}.ffn.fc1.weight": (M, D), f"{layer}.ffn.fc1.bias": (M,)}
        shapes |= {f"{layer}.ffn.fc2.weight": (D, M), f"{layer}.ffn.fc2.bias": (D,)}
        for name in ("query", "key", "value", "out"):
            shapes |= {f"{layer}.attn.{name}.weight": (D, D), f"{layer}.attn.{name}.bias": (D,)}
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator) * 0.2 for key, shape in shapes.items()}


def seed_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int, layers: int) -> torch.Tensor:
    """The seed repo's forward written out with torch.nn.functional: exact GELU, LayerNorm eps 1e-6."""
    D = sd["transformer.embeddings.cls_token"].shape[-1]
    P = sd["transformer.embeddings.patch_embeddings.weight"].shape[-1]
    w = lambda name: (sd[f"{name}.weight"], sd[f"{name}.bias"])  # noqa: E731
    h = F.conv2d(x, *w("transformer.embeddings.patch_embeddings"), stride=P).flatten(2).transpose(1, 2)
    h = torch.cat([sd["transformer.embeddings.cls_token"].expand(len(x), -1, -1), h], 1)
    h = h + sd["transformer.embeddings.position_embeddings"]
    B, S, _ = h.shape
    for i in range(layers):
        layer = f"transformer.encoder.layer.{i}"
        y = F.layer_norm(h, (D,), *w(f"{layer}.attention_norm"), eps=1e-6)
        q, k, v = (
            F.linear(y, *w(f"{layer}.attn.{name}")).view(B, S, heads, -1).transpose(1, 2)
            for name in ("query", "key", "value")
        )
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads), dim=-1)
        h = h + F.linear((probs @ v).transpose(1, 2).reshape(B, S, D), *w(f"{layer}.attn.out"))
        y = F.layer_norm(h, (D,), *w(f"{layer}.ffn_norm"), eps=1e-6)
        h = h + F.linear(F.gelu(F.linear(y, *w(f"{layer}.ffn.fc1"))), *w(f"{layer}.ffn.fc2"))
    h = F.layer_norm(h, (D,), *w("transformer.encoder.encoder_norm"), eps=1e-6)
    return F.linear(h[:, 0], *w("head"))


def test_seed_state_dict_loads_strict_and_gives_the_seed_logits(pixel_values):
    config = tiny_config(hidden_act="gelu")  # the seed repo uses exact GELU
    state_dict = seed_state_dict(config)
    assert sorted(state_dict) == sorted(seed_keys(2))
    model = VisionTransformerForImageClassification(config).eval()
    model.load_state_dict(state_dict, strict=True)
    expected = seed_forward(state_dict, pixel_values, heads=4, layers=2)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values).logits, expected, atol=1e-5, rtol=1e-5)


def test_tanh_gelu_default_differs_from_exact_gelu(pixel_values):
    exact, approximate = classifier(hidden_act="gelu"), classifier()
    assert exact.transformer.encoder.layer[0].ffn.act_fn(torch.tensor(1.0)) != approximate.transformer.encoder.layer[
        0
    ].ffn.act_fn(torch.tensor(1.0))
    torch.testing.assert_close(
        approximate.transformer.encoder.layer[0].ffn.act_fn(torch.linspace(-3, 3, 7)),
        F.gelu(torch.linspace(-3, 3, 7), approximate="tanh"),
    )


# -- attention implementations ---------------------------------------------------------------------------------------


def reloaded(model, tmp_path, **kwargs):
    model.save_pretrained(tmp_path)
    return VisionTransformerForImageClassification.from_pretrained(tmp_path, **kwargs).eval()


def test_sdpa_is_the_default_and_equals_eager(tmp_path, pixel_values):
    model = classifier()
    assert model.config._attn_implementation == "sdpa"
    eager = reloaded(model, tmp_path, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values).logits, eager(pixel_values).logits, atol=1e-5, rtol=0)


def test_attention_implementation_can_be_switched_on_a_loaded_model(pixel_values):
    model = classifier()
    with torch.no_grad():
        sdpa_logits = model(pixel_values).logits
        model.set_attn_implementation("eager")  # transformers allows it only for models that use the interface
        assert model.config._attn_implementation == "eager"
        with unittest.mock.patch.object(F, "scaled_dot_product_attention", side_effect=AssertionError("sdpa called")):
            torch.testing.assert_close(model(pixel_values).logits, sdpa_logits, atol=1e-5, rtol=0)


def test_output_attentions_with_sdpa_returns_the_eager_maps(tmp_path, pixel_values):
    model = classifier()
    eager = reloaded(model, tmp_path, attn_implementation="eager")
    with torch.no_grad():
        sdpa_maps = model(pixel_values, output_attentions=True).attentions
        eager_maps = eager(pixel_values, output_attentions=True).attentions
    assert len(sdpa_maps) == 2
    for sdpa_map, eager_map in zip(sdpa_maps, eager_maps, strict=True):
        torch.testing.assert_close(sdpa_map, eager_map, atol=1e-6, rtol=0)
        torch.testing.assert_close(sdpa_map.sum(-1), torch.ones(2, 4, 17))
    assert model(pixel_values).attentions is None


def test_flex_attention_where_the_stack_has_it(tmp_path, pixel_values):
    model = classifier()
    try:
        flex = reloaded(model, tmp_path, attn_implementation="flex_attention")
    except (ImportError, ValueError) as error:
        pytest.skip(f"flex_attention unavailable here: {error}")
    with torch.no_grad():  # FlexAttention has no backward on CPU
        torch.testing.assert_close(model(pixel_values).logits, flex(pixel_values).logits, atol=1e-5, rtol=0)


def test_hidden_states_are_block_inputs_then_last_block_output(pixel_values):
    model = classifier()
    outputs = model.transformer(pixel_values, output_hidden_states=True)
    embeddings = model.transformer.embeddings(pixel_values)
    torch.testing.assert_close(outputs.hidden_states[0], embeddings)
    torch.testing.assert_close(
        model.transformer.encoder.encoder_norm(outputs.hidden_states[-1]), outputs.last_hidden_state
    )


# -- resolution ------------------------------------------------------------------------------------------------------


def test_interpolate_pos_encoding_non_square_48x64_matches_scipy_zoom():
    model = classifier()
    pixels = torch.randn(1, 3, 48, 64)
    assert model(pixels, interpolate_pos_encoding=True).logits.shape == (1, 10)

    position_embeddings = model.transformer.embeddings.position_embeddings.detach()
    resampled = resample_position_embeddings(position_embeddings, (4, 4), (6, 8), num_prefix_tokens=1)
    grid = position_embeddings[0, 1:].reshape(4, 4, 32).double().numpy()
    expected = scipy.ndimage.zoom(grid, (6 / 4, 8 / 4, 1), order=1).reshape(48, 32)
    assert resampled.shape == (1, 49, 32)
    torch.testing.assert_close(resampled[0, 0], position_embeddings[0, 0])  # the class-token row is kept
    np.testing.assert_allclose(resampled[0, 1:].numpy(), expected, atol=1e-6)


def test_interpolation_at_the_native_size_changes_nothing(pixel_values):
    model = classifier()
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixel_values, interpolate_pos_encoding=True).logits, model(pixel_values).logits
        )


# -- bad input -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, kwargs, message",
    [
        (
            (2, 3, 48, 64),
            {},
            r"Input image size \(48x64\) doesn't match the model \(32x32\).*interpolate_pos_encoding",
        ),
        (
            (2, 3, 36, 32),
            dict(interpolate_pos_encoding=True),
            r"\(36x32\) must be divisible by the patch size \(8x8\)",
        ),
        ((2, 1, 32, 32), {}, r"Expected 3 channels in pixel_values but got 1"),
        ((3, 32, 32), {}, r"pixel_values must have 4 dimensions \(batch, channels, height, width\), got shape"),
    ],
)
def test_bad_pixel_values_raise_clear_errors(shape, kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        classifier()(torch.randn(shape), **kwargs)
    assert "\n" not in str(error.value)


def test_integer_images_are_refused_instead_of_classified_unnormalised():
    # uint8 pixels in 0..255 were cast to float and gave confident logits for an input 100x off the [-1, 1] range.
    for dtype in (torch.uint8, torch.int64, torch.bool):
        with pytest.raises(ValueError, match=rf"pixel_values are {dtype}: .*normalised as the image processor"):
            classifier()(torch.zeros(1, 3, 32, 32, dtype=dtype))
    with pytest.raises(TypeError, match=r"pixel_values must be a torch.Tensor, got ndarray: torch.from_numpy"):
        classifier()(np.zeros((1, 3, 32, 32), dtype=np.float32))
    float64 = torch.randn(1, 3, 32, 32, dtype=torch.float64)  # any float dtype is fine: cast to the weights'
    model = classifier()
    torch.testing.assert_close(model(float64).logits, model(float64.float()).logits)


def test_an_empty_batch_is_one_clear_error():
    # It failed in a reshape inside the attention ("cannot reshape tensor of 0 elements into shape [0, 5, -1, 8]").
    with pytest.raises(ValueError, match=r"pixel_values hold no images \(shape \(0, 3, 32, 32\)\): pass at least one"):
        classifier()(torch.randn(0, 3, 32, 32))


# -- training --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "problem_type, labels",
    [
        ("single_label_classification", torch.tensor([3, 7])),
        ("multi_label_classification", torch.tensor([[1.0] + [0.0] * 9, [0.0, 1.0] * 5])),
        ("regression", torch.randn(2, 10)),
    ],
)
def test_loss_by_problem_type_and_backward(problem_type, labels, pixel_values):
    # Classification is inferred from the labels' dtype as transformers does; regression is asked for.
    model = classifier(problem_type="regression" if problem_type == "regression" else None).train()
    outputs = model(pixel_values, labels=labels)
    assert model.config.problem_type == problem_type
    logits = outputs.logits
    expected = {
        "single_label_classification": lambda: F.cross_entropy(logits, labels),
        "multi_label_classification": lambda: F.binary_cross_entropy_with_logits(logits, labels),
        "regression": lambda: F.mse_loss(logits, labels),
    }[problem_type]()
    torch.testing.assert_close(outputs.loss, expected)
    outputs.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def gradients(model, pixel_values, labels):
    model.zero_grad()
    model(pixel_values, labels=labels).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_gradient_checkpointing_gives_the_same_gradients(pixel_values):
    model = classifier().train()
    labels = torch.tensor([1, 2])
    plain = gradients(model, pixel_values, labels)
    model.activation_checkpointing_enable()
    assert model.transformer.encoder.layer[0].gradient_checkpointing
    checkpointed = gradients(model, pixel_values, labels)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_dropout_only_acts_in_training(pixel_values):
    model = classifier(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values).logits, model(pixel_values).logits)
        model.train()
        assert not torch.equal(model(pixel_values).logits, model(pixel_values).logits)


def test_torch_compile_fullgraph_has_no_graph_breaks(pixel_values):
    model = classifier()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph raises on any graph break
    with torch.no_grad():
        torch.testing.assert_close(compiled(pixel_values).logits, model(pixel_values).logits)
    loss = compiled(pixel_values, labels=torch.tensor([1, 2])).loss
    loss.backward()
    assert model.head.weight.grad is not None


def test_base_model_loads_from_a_classifier_checkpoint(tmp_path, pixel_values):
    model = classifier()
    model.save_pretrained(tmp_path)
    base = VisionTransformerModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(base(pixel_values).pooler_output, model.transformer(pixel_values).pooler_output)
