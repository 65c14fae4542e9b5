"""The Qwen3-VL teacher encoder on a tiny random VLM built and loaded like the real one."""

import copy
import gc
import weakref

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model, Qwen3VLConfig

from dopsd_ray.families.tiny_tokenizer import build_tiny_tokenizer
from dopsd_ray.families.vlm import (
    IMAGE_TOKEN, VLMEncoder, VLMProcessor, build_tiny_vlm, language_model_state, load_vlm, mrope_section,
    select_hidden_states, share_language_model,
)

CAPTIONS = ["a cat", "a red square on a blue field"]


def text_config(tokenizer, layers: int = 2, hidden: int = 16) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=32, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, pad_token_id=tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tokenizer = build_tiny_tokenizer()
    config = text_config(tokenizer)
    torch.manual_seed(0)
    text_encoder = Qwen3Model(config).eval().requires_grad_(False)  # frozen, as the families' text encoders
    path = build_tiny_vlm(config, tokenizer, tmp_path_factory.mktemp("tiny_vlm"), seed=1)
    encoder = VLMEncoder.from_pretrained(path, text_encoder, min_pixels=32 * 32, max_pixels=64 * 64)
    return path, tokenizer, text_encoder, encoder


def images(seed: int, batch: int = 2, height: int = 64, width: int = 48) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_tiny_vlm_config_matches_the_text_encoder(tiny):
    path, tokenizer, text_encoder, _ = tiny
    config = Qwen3VLConfig.from_pretrained(path)
    te = text_encoder.config
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim"):
        assert getattr(config.text_config, key) == getattr(te, key), key
    assert sum(config.text_config.rope_parameters["mrope_section"]) == te.head_dim // 2
    assert config.vision_config.out_hidden_size == te.hidden_size
    assert config.image_token_id == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert (path / "model.safetensors").is_file()
    assert mrope_section(128) == [24, 20, 20]


def test_language_model_weights_are_the_text_encoder(tiny):
    _, _, text_encoder, encoder = tiny
    lm = encoder.model.model.language_model.state_dict()
    assert lm.keys() == text_encoder.state_dict().keys()
    assert all(torch.equal(lm[k], v) for k, v in text_encoder.state_dict().items())
    assert not any(p.requires_grad for p in encoder.model.parameters()) and not encoder.model.training


def test_causal_lm_layout_is_accepted(tiny):
    path, tokenizer, _, _ = tiny
    torch.manual_seed(2)
    causal = Qwen3ForCausalLM(text_config(tokenizer)).eval().requires_grad_(False)  # FLUX.2's text encoder class
    encoder = VLMEncoder.from_pretrained(path, causal, min_pixels=32 * 32, max_pixels=64 * 64)
    lm = encoder.model.model.language_model.state_dict()
    assert all(torch.equal(lm[k], v) for k, v in causal.model.state_dict().items())


def test_mismatched_text_encoder_is_a_clear_error(tiny):
    path, tokenizer, text_encoder, encoder = tiny
    deeper = Qwen3Model(text_config(tokenizer, layers=3, hidden=24))
    with pytest.raises(ValueError) as error:
        share_language_model(encoder.model, deeper)
    message = str(error.value)
    assert "do not match the VLM's language model" in message
    assert "only in the text encoder (" in message and "layers.2." in message
    assert "shape mismatches" in message and "embed_tokens.weight" in message
    with pytest.raises(ValueError, match="do not match the VLM's language model"):
        VLMEncoder.from_pretrained(path, deeper, min_pixels=32 * 32, max_pixels=64 * 64)
    # a shared tensor cannot be cast as load_state_dict did: the dtype must match too
    with pytest.raises(ValueError, match=r"dtype mismatches .*embed_tokens\.weight"):
        share_language_model(load_vlm(path), copy.deepcopy(text_encoder).to(torch.bfloat16))


# -- the language model is shared with the text encoder, not copied -----------------------


def fresh_text_encoder(tokenizer, kind: str, seed: int = 3):
    torch.manual_seed(seed)
    cls = {"Qwen3Model": Qwen3Model, "Qwen3ForCausalLM": Qwen3ForCausalLM}[kind]  # Z-Image, FLUX.2-klein
    return cls(text_config(tokenizer)).eval().requires_grad_(False)


@pytest.mark.parametrize("kind", ["Qwen3Model", "Qwen3ForCausalLM"])
def test_language_model_shares_the_text_encoder_tensors(tiny, kind):
    path, tokenizer, _, _ = tiny
    text_encoder = fresh_text_encoder(tokenizer, kind)
    encoder = VLMEncoder.from_pretrained(path, text_encoder, min_pixels=32 * 32, max_pixels=64 * 64)
    source = language_model_state(text_encoder, keep_vars=True)
    lm_params = list(encoder.model.model.language_model.named_parameters(remove_duplicate=False))
    assert {name for name, _ in lm_params} == set(source)
    for name, p in lm_params:
        assert p is source[name] and p.data_ptr() == source[name].data_ptr(), name
    assert not any(p.requires_grad for p in encoder.model.parameters())

    # the features are those of the old copy semantics (load_state_dict of the same weights)
    copied = load_vlm(path)
    copied.model.language_model.load_state_dict(language_model_state(text_encoder), strict=True)
    x = images(5)
    shared_features = encoder.encode(CAPTIONS, x, hidden_state_layers=(0, 1, 2), max_length=128)
    copied_features = VLMEncoder(copied, encoder.processor).encode(
        CAPTIONS, x, hidden_state_layers=(0, 1, 2), max_length=128)
    assert all(torch.equal(a, b) for a, b in zip(shared_features, copied_features, strict=True))

    # proof of sharing: an in-place change to the text encoder is seen by the VLM (and not by the copy)
    with torch.no_grad():
        source["layers.1.mlp.down_proj.weight"].mul_(3.0)
    changed = encoder.encode(CAPTIONS, x, hidden_state_layers=(0, 1, 2), max_length=128)
    assert all(not torch.allclose(a, b) for a, b in zip(changed, shared_features, strict=True))
    again = VLMEncoder(copied, encoder.processor).encode(CAPTIONS, x, hidden_state_layers=(0, 1, 2), max_length=128)
    assert all(torch.equal(a, b) for a, b in zip(again, copied_features, strict=True))


def test_sharing_frees_the_vlm_copy_and_follows_a_tied_lm_head(tiny):
    path, tokenizer, _, _ = tiny
    text_encoder = fresh_text_encoder(tokenizer, "Qwen3ForCausalLM")
    vlm = load_vlm(path)
    lm = vlm.model.language_model
    vlm.lm_head.weight = lm.embed_tokens.weight  # tied, as in the released Qwen3-VL-4B
    inv_freq = lm.rotary_emb.inv_freq
    old = [weakref.ref(p) for p in lm.parameters()]
    share_language_model(vlm, text_encoder)
    assert vlm.lm_head.weight is text_encoder.model.embed_tokens.weight
    assert lm.rotary_emb.inv_freq is inv_freq  # non-persistent buffers stay the VLM's own
    gc.collect()
    assert all(ref() is None for ref in old)  # nothing keeps the VLM's own language model alive


def test_text_encoder_on_another_device_is_a_clear_error(tiny):
    path, tokenizer, _, _ = tiny
    with torch.device("meta"):
        elsewhere = Qwen3Model(text_config(tokenizer))
    with pytest.raises(ValueError, match=r"text encoder is on \['meta'\] but the VLM goes to cpu"):
        VLMEncoder.from_pretrained(path, elsewhere, min_pixels=32 * 32, max_pixels=64 * 64)


def test_processor_expands_the_image_and_uses_the_chat_layout(tiny):
    _, tokenizer, _, encoder = tiny
    processor: VLMProcessor = encoder.processor
    assert (processor.image_processor.size.shortest_edge, processor.image_processor.size.longest_edge) == (1024, 4096)
    inputs = processor(CAPTIONS, images(0), max_length=128)
    # 64 x 48 at 32*32..64*64 pixels -> 64 x 64 -> a 4 x 4 patch grid -> 4 merged tokens
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    assert inputs["pixel_values"].shape == (32, 3 * 2 * 16 * 16)
    assert (inputs["input_ids"] == processor.image_token_id).sum(1).tolist() == [4, 4]
    assert torch.equal(inputs["mm_token_type_ids"].bool(), inputs["input_ids"] == processor.image_token_id)
    first = inputs["input_ids"][0][inputs["attention_mask"][0].bool()]
    text = tokenizer.decode(first)
    assert text == (
        "<|im_start|>user\n<|vision_start|>" + IMAGE_TOKEN * 4 + "<|vision_end|>a cat<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    small = VLMProcessor(tokenizer, type(processor.image_processor)(
        patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32, max_pixels=32 * 32))
    assert small(CAPTIONS[:1], images(0, 1), max_length=128)["image_grid_thw"].tolist() == [[1, 2, 2]]


def test_encode_strips_padding_and_selects_layers(tiny):
    _, _, _, encoder = tiny
    x = images(1)
    inputs = encoder.processor(CAPTIONS, x, max_length=128)
    features = encoder.encode(CAPTIONS, x, hidden_state_layers=-2, max_length=128)
    assert [f.shape for f in features] == [(n, 16) for n in inputs["attention_mask"].sum(1).tolist()]
    assert not features[0].requires_grad
    alone = encoder.encode(CAPTIONS[:1], x[:1], hidden_state_layers=-2, max_length=128)
    assert torch.allclose(alone[0], features[0], atol=1e-5)  # padding does not leak into features

    stacked = encoder.encode(CAPTIONS, x, hidden_state_layers=(0, 1, 2), max_length=128)
    per_layer = [encoder.encode(CAPTIONS, x, hidden_state_layers=k, max_length=128) for k in (0, 1, 2)]
    for i in range(2):
        assert torch.allclose(stacked[i], torch.cat([layer[i] for layer in per_layer], dim=-1))
    hidden = tuple(torch.full((1, 2, 3), float(k)) for k in range(4))
    assert select_hidden_states(hidden, (1, 3))[0, 0].tolist() == [1, 1, 1, 3, 3, 3]


def test_features_depend_on_the_image(tiny):
    _, _, _, encoder = tiny
    a = encoder.encode(CAPTIONS, images(2))
    b = encoder.encode(CAPTIONS, images(3))
    assert all(x.shape == y.shape and not torch.allclose(x, y) for x, y in zip(a, b))


def test_image_that_does_not_fit_max_length_is_an_error(tiny):
    _, _, _, encoder = tiny
    with pytest.raises(ValueError, match="needs 4 tokens but only"):
        encoder.encode(CAPTIONS, images(4), max_length=8)
