"""What spec factories return. Pixels cross every boundary as uint8 NCHW; each component owns
its own normalisation (VFMs their mean/std and resize, tokenizers their latent statistics)."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from .specs import TokenizerSpec, VfmSpec


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW in [0, 255] -> float32 NCHW in [-1, 1]."""
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 NCHW, got {images.dtype}")
    return images.float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float NCHW in about [-1, 1] -> uint8 NCHW (clamped, rounded)."""
    return x.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Frozen vision foundation models


@dataclass
class VfmTokens:
    """Tokens of the requested layers. ``layers[i]`` is [B, N, D] patch tokens (prefix tokens
    excluded) laid out row-major on ``grid`` = (h, w); ``prefix[i]`` is [B, P, D] (class and
    register tokens; P may be 0)."""

    layers: dict[int, torch.Tensor]
    grid: tuple[int, int]
    prefix: dict[int, torch.Tensor] = field(default_factory=dict)


class Vfm(nn.Module, abc.ABC):
    """A frozen VFM. Index convention: 0 = embedding output, k = output of block k,
    -1 = final normed output, -2 = the block before it. ``scale`` overrides the input resize factor;
    ``pre_scale`` != 1 resizes the image by that factor first (two resizes; VFM-VAE's equivariance)."""

    spec: VfmSpec
    weights_id: str = "random-init"  # sha256 prefix of the weights file, or 'random-init'
    embed_dim: int
    patch_size: int
    num_blocks: int

    @abc.abstractmethod
    def forward(self, images: torch.Tensor, layers: Sequence[int] = (-1,), scale: float | None = None, pre_scale: float = 1.0) -> VfmTokens:
        ...


# ---------------------------------------------------------------------------------------------
# Training phases (one loop for every trainable component)


@dataclass
class Phase:
    """One optimiser of a trainable component: its parameters and Adam(W) settings.
    The loop calls ``component.phase_loss(phase.name, batch, nimg)`` for each phase every step."""

    name: str
    params: list[nn.Parameter]
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    ema: bool = True  # keep an EMA of these parameters (off for a discriminator)


@dataclass
class TrainStage:
    """One stage of a multi-stage training recipe (e.g. VFM-VAE's four stages). Each stage has its
    own length in images and learning rate; ``settings`` carries whatever the component needs to
    switch (loss weights, which modules train). Stage i+1 starts from stage i's final weights."""

    name: str
    images: int
    lr: float
    settings: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Tokenizers


class DiagonalGaussian:
    """A diagonal Gaussian posterior with clamped log-variance."""

    @abc.abstractmethod
    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over C, H, W: one value per sample."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class Tokenizer(nn.Module, abc.ABC):
    """Encode uint8 images to latents and decode latents to images.

    Latents returned by ``encode`` are raw; ``normalize``/``denormalize`` map them to and from
    the diffusion model's input space with the tokenizer's own per-channel statistics (set by
    the runner from the training split through ``set_latent_stats``).
    """

    spec: TokenizerSpec
    weights_id: str = "trained"
    # Sub-modules that are frozen for good (a VFM encoder): not saved with the tokenizer's weights.
    frozen_prefixes: tuple[str, ...] = ()

    def __init__(self, latent_channels: int, downsample: int):
        super().__init__()
        self.latent_channels = latent_channels
        self.downsample = downsample
        self.register_buffer("latent_mean", torch.zeros(latent_channels))
        self.register_buffer("latent_std", torch.ones(latent_channels))

    @abc.abstractmethod
    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """uint8 NCHW -> posterior over raw latents."""

    @abc.abstractmethod
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents -> float images in about [-1, 1]."""
        ...

    @abc.abstractmethod
    def training_phases(self, lr: float) -> list[Phase]:
        """The optimisers of this component at base learning rate ``lr`` (e.g. generator and discriminator)."""

    @abc.abstractmethod
    def phase_loss(self, phase: str, images: torch.Tensor, labels: torch.Tensor, nimg: int) -> tuple[torch.Tensor, dict[str, float]]:
        ...

    # -- shared --
    def training_stages(self, images: int, lr: float) -> list[TrainStage]:
        """The training recipe; by default one stage of ``tokenizer.train.images`` at ``tokenizer.train.lr``."""
        return [TrainStage("main", images, lr)]

    def begin_stage(self, stage: TrainStage) -> None:
        """Switch to ``stage`` (freeze/unfreeze modules, set loss weights) before its training starts."""

    def vfm_request(self) -> "tuple[Vfm, list[int]] | None":
        """For tokenizers whose ``encode`` is a function of frozen VFM tokens: (the VFM, the tapped
        layers). The runner then caches those tokens on disk and calls ``encode_from_vfm``."""
        return None

    def encode_from_vfm(self, tokens: VfmTokens) -> DiagonalGaussian:
        """``encode`` from precomputed VFM tokens (needed when ``vfm_request`` is not None)."""
        raise TypeError(f"{type(self).__name__} declares a vfm_request but no encode_from_vfm")

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        g = resolution // self.downsample
        return (self.latent_channels, g, g)

    def reconstruct(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 -> uint8 through a posterior sample (as the peers' reconstruction protocol)."""
        return to_uint8(self.decode(self.encode(images).sample(generator)))

    def decode_uint8(self, z: torch.Tensor) -> torch.Tensor:
        return to_uint8(self.decode(z))

    def weights_state(self) -> dict[str, torch.Tensor]:
        """The tokenizer's own weights: its state dict without the permanently frozen sub-modules."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(self.frozen_prefixes)}

    def set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std.clamp_min(1e-6))

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latent_mean.view(1, -1, 1, 1)) / self.latent_std.view(1, -1, 1, 1)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latent_std.view(1, -1, 1, 1) + self.latent_mean.view(1, -1, 1, 1)


# ---------------------------------------------------------------------------------------------
# Diffusion models


class DiffusionModel(nn.Module, abc.ABC):
    """A class-conditional velocity model on normalised latents.

    Path convention: t in [0, 1], t = 0 is noise and t = 1 is data, x_t = (1 - t) eps + t x,
    target velocity v = x - eps. ``num_classes`` is the null (unconditional) label.
    """

    num_classes: int

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Velocity at (x, t) for the given labels (``num_classes`` = unconditional)."""
        ...

    @abc.abstractmethod
    def training_phases(self, lr: float) -> list[Phase]:
        """The optimisers of this component at base learning rate ``lr`` (e.g. generator and discriminator)."""

    @abc.abstractmethod
    def phase_loss(self, phase: str, latents: torch.Tensor, labels: torch.Tensor, nimg: int) -> tuple[torch.Tensor, dict[str, float]]:
        ...
