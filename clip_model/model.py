"""CLIP: contrastive language-image pre-training (Radford et al. 2021, arXiv:2103.00020).

Two encoders map an image and a text into one `embed_dim` space; training makes the cosine
similarity of matching pairs high and of the other N^2 - N pairs in a batch low (clip_model.loss).

Read top to bottom, as the paper's section 2.4 ("Choosing and Scaling a Model"):
  1. the transformer block both encoders share (pre-norm residual attention + MLP);
  2. the Vision Transformer image encoder (class token, learned positions, an extra LayerNorm
     before the transformer, as the paper notes);
  3. the modified ResNet image encoder (3-conv stem, anti-aliased strided convolutions, and an
     attention pool in place of global average pooling);
  4. the text transformer (causal self-attention; the [EOS] activation is the feature);
  5. CLIP itself: linear projections into the joint space and a learned temperature.

Parameter names and shapes are those of OpenAI's `clip/model.py` (and OpenCLIP's), so their
checkpoints load with `load_state_dict` unchanged; tensors are batch-first ([N, L, D]) here.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clip_model.config import ModelConfig

# ---------------------------------------------------------------------------------------------
# 1. The transformer block
# ---------------------------------------------------------------------------------------------


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI trained its released models with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation_layer(name: str) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, so fp16/bf16 weights stay stable (as OpenAI)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 or torch.is_autocast_enabled(x.device.type):
            return super().forward(x)  # autocast already runs layer_norm in fp32
        weight, bias = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False):
    """softmax(q k^T / sqrt(d)) v over [N, heads, L, head_dim] tensors.

    `F.scaled_dot_product_attention` everywhere but in one case: training in bf16/fp16 on a
    CPU. There its flash kernel's forward + backward took 2.5-3.5x as long as two batched
    matmuls at CLIP's sequence lengths (32-77 tokens, torch 2.13), which cost the tiny preset
    a third of its bf16 training throughput.
    """
    if q.device.type != "cpu" or q.dtype == torch.float32 or not torch.is_grad_enabled():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if causal:
        length = q.shape[-2]
        mask = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype) @ v


class MultiheadSelfAttention(nn.Module):
    """Self-attention with `nn.MultiheadAttention`'s parameter names (in_proj_weight, out_proj),
    so OpenAI's state dicts load, computed by `attention` (fused SDPA kernels)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        n, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        # causal=True is exactly OpenAI's mask: -inf above the diagonal
        x = attention(q, k, v, causal)
        return self.out_proj(x.transpose(1, 2).reshape(n, length, width))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, activation: str):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = LayerNorm(width)
        self.attn = MultiheadSelfAttention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, hidden),
                gelu=activation_layer(activation),
                c_proj=nn.Linear(hidden, width),
            )
        )

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, activation: str):
        super().__init__()
        self.width, self.layers = width, layers
        self.grad_checkpointing = False  # the paper trains with gradient checkpointing
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, activation) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal=causal)
        return x

    def init_weights(self) -> None:
        # OpenAI's scheme: attention/projection std shrinks with width and depth
        proj_std = (self.width**-0.5) * ((2 * self.layers) ** -0.5)
        attn_std = self.width**-0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)


# ---------------------------------------------------------------------------------------------
# 2. Vision Transformer (Dosovitskiy et al. 2020) with CLIP's extra pre-transformer LayerNorm
# ---------------------------------------------------------------------------------------------


class VisionTransformer(nn.Module):
    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
        mlp_ratio: float,
        activation: str,
    ):
        super().__init__()
        self.input_resolution = image_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        grid = image_size // patch_size
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)  # "an additional layer normalization ... before the
        self.transformer = Transformer(width, layers, heads, mlp_ratio, activation)  # transformer"
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # [N, width, grid, grid]: one linear embedding per patch
        x = x.flatten(2).transpose(1, 2)  # [N, grid*grid, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # the class token is the image feature


# ---------------------------------------------------------------------------------------------
# 3. Modified ResNet (He et al. 2016 with ResNet-D stem, Zhang 2019 blur-pool, attention pool)
# ---------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        # every conv has stride 1; an avgpool does the striding (anti-aliased downsampling)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """One multi-head attention layer whose query is the global-average-pooled feature."""

    def __init__(self, spacial_dim: int, embed_dim: int, heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(
            torch.randn(spacial_dim**2 + 1, embed_dim) / embed_dim**0.5
        )
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # [N, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # the mean token leads
        x = x + self.positional_embedding.to(x.dtype)
        n, length, width = x.shape
        head_dim = width // self.heads
        q = self.q_proj(x[:, :1]).view(n, 1, self.heads, head_dim).transpose(1, 2)
        k = self.k_proj(x).view(n, length, self.heads, head_dim).transpose(1, 2)
        v = self.v_proj(x).view(n, length, self.heads, head_dim).transpose(1, 2)
        x = F.scaled_dot_product_attention(q, k, v)  # [N, heads, 1, head_dim]
        return self.c_proj(x.transpose(1, 2).reshape(n, width))


class ModifiedResNet(nn.Module):
    def __init__(
        self, *, layers: tuple[int, ...], output_dim: int, heads: int, image_size: int, width: int
    ):
        super().__init__()
        self.input_resolution = image_size
        # 3-layer stem (ResNet-D) with an average pool instead of a max pool
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)

        embed_dim = width * 32  # the ResNet feature dimension
        self.attnpool = AttentionPool2d(image_size // 32, embed_dim, heads, output_dim)
        self.grad_checkpointing = False

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def init_weights(self) -> None:
        std = self.attnpool.c_proj.in_features**-0.5
        for linear in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj):
            nn.init.normal_(linear.weight, std=std)
        nn.init.normal_(self.attnpool.c_proj.weight, std=std)
        # each residual branch starts as the identity (Goyal et al. 2017)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return self.attnpool(x)


# ---------------------------------------------------------------------------------------------
# 4 + 5. CLIP: text transformer, projections into the joint space, learned temperature
# ---------------------------------------------------------------------------------------------


class CLIP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        if c.is_vit:
            self.visual = VisionTransformer(
                image_size=c.image_size,
                patch_size=c.vision_patch_size,
                width=c.vision_width,
                layers=c.vision_layers,
                heads=c.vision_heads,
                output_dim=c.embed_dim,
                mlp_ratio=c.mlp_ratio,
                activation=c.activation,
            )
        else:
            self.visual = ModifiedResNet(
                layers=tuple(c.vision_layers),
                output_dim=c.embed_dim,
                heads=c.vision_heads,
                image_size=c.image_size,
                width=c.vision_width,
            )

        # the text encoder: a 63M-parameter 12-layer 512-wide transformer with 8 heads in the
        # paper, with masked (causal) self-attention so it could be initialised from a language
        # model
        self.transformer = Transformer(
            c.text_width, c.text_layers, c.text_heads, c.mlp_ratio, c.activation
        )
        self.token_embedding = nn.Embedding(c.vocab_size, c.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.text_width))
        self.ln_final = LayerNorm(c.text_width)
        self.text_projection = nn.Parameter(torch.empty(c.text_width, c.embed_dim))

        # "the temperature parameter ... initialized to the equivalent of 0.07"
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # encode_text checks the token ids against the vocabulary: a host read of min/max, which
        # on a GPU makes the caller wait for the device. Training turns it off (its tokenizer is
        # the one the vocabulary was fitted to, clip_model/train.py; its step reads nothing).
        self.check_token_ids = True
        self.init_weights()
        self.set_grad_checkpointing(c.grad_checkpointing)

    def init_weights(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            self.visual.init_weights()
        else:
            self.visual.transformer.init_weights()
        self.transformer.init_weights()
        nn.init.normal_(self.text_projection, std=self.config.text_width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in backward: less memory for about a third more compute."""
        self.transformer.grad_checkpointing = enable
        target = self.visual.transformer if self.config.is_vit else self.visual
        target.grad_checkpointing = enable

    @property
    def dtype(self) -> torch.dtype:
        return self.text_projection.dtype

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] normalised pixels -> [N, embed_dim] unnormalised image features."""
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (size, size):
            raise ValueError(
                f"images: expected shape [N, 3, {size}, {size}] (model {self.config.name!r}), "
                f"got {list(images.shape)}"
            )
        if not images.is_floating_point():
            raise TypeError(f"images: expected a float tensor, got {images.dtype}")
        if not torch.is_autocast_enabled(images.device.type):
            images = images.to(self.dtype)
        return self.visual(images)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """[N, context_length] token ids -> [N, embed_dim] unnormalised text features."""
        if text.ndim != 2 or text.shape[1] > self.config.context_length:
            raise ValueError(
                f"text: expected token ids of shape [N, <= {self.config.context_length}], "
                f"got {list(text.shape)}"
            )
        if text.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"text: expected integer token ids, got {text.dtype}")
        if self.check_token_ids and text.numel() and not torch.compiler.is_compiling():
            low, high = int(text.min()), int(text.max())
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(
                    f"text: token ids must lie in [0, {self.config.vocab_size}), got {low}..{high};"
                    " was it tokenized with this model's tokenizer?"
                )
        length = text.shape[1]
        x = self.token_embedding(text) + self.positional_embedding[:length]
        x = self.transformer(x, causal=True)
        x = self.ln_final(x)
        # the feature is the activation at [EOS]: the highest token id in every sequence
        eos = text.argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), eos] @ self.text_projection

    def forward(
        self, images: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised image and text features and the temperature exp(logit_scale) <= 100."""
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        # "clipped to prevent scaling the logits by more than 100". Trainers also clamp the
        # parameter in place after each step (as OpenCLIP), so it never idles above the bound.
        logit_scale = self.logit_scale.clamp(max=math.log(100)).exp()
        return image_features, text_features, logit_scale


def create_model(name_or_config: str | ModelConfig | dict, **overrides) -> CLIP:
    """Build a randomly initialised CLIP from a preset name, a YAML path, a dict or a config.

    `overrides` replace config fields, e.g. `create_model("tiny", grad_checkpointing=True)`.
    """
    config = ModelConfig.load(name_or_config)
    if overrides:
        config = ModelConfig(**{**config.model_dump(), **overrides})
    return CLIP(config)
