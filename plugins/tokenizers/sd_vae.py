"""Plugin: ``sd-vae``, the LDM AutoencoderKL (kl-f8, 4 channels; Rombach et al. 2022), and the
``ldm-decoder`` decoder. The LDM machinery here is shared by ``va-vae`` and ``distill``.

``sd-vae`` is diffusers' ``AutoencoderKL`` used as a library. Its weights are, by
``tokenizer.args.pretrained``:

* ``""``: random init of the configured architecture (trained from scratch with the shared
  L1 + LPIPS + KL stack, ``vfmbench_plugins.recon_losses``);
* ``ft-ema`` / ``ft-mse``: the official ``stabilityai/sd-vae-ft-ema`` / ``-ft-mse`` folders, read
  from the Hugging Face cache (downloaded only when ``HF_HUB_OFFLINE`` is unset);
* a path: a diffusers folder (``config.json`` + weights, or a pipeline folder with ``vae/``), or one file in the original LDM layout
  (e.g. ``vae-ft-mse-840000-ema-pruned.safetensors``), converted by ``LDM_KEY_TABLE``.

A missing file raises ``MissingWeightsError`` naming every place looked at, as for VFMs.

**Latent normalisation is spec data** (``TokenizerSpec.normalisation`` and
``tokenizer.args.normalisation``): ``scaling-factor`` (default) maps z to
``(z - shift_factor) * scaling_factor`` with the weights' own config values (SD 1.x/2.x: no shift,
0.18215), whatever statistics the runner measures; ``per-channel`` uses the runner's per-channel
mean/std of the training latents. The effective values live in the ``latent_mean``/``latent_std``
buffers of the saved ``model.pt``.

``ldm-decoder`` is the LDM decoder (``post_quant_conv`` + ResNet levels with nearest upsampling,
single-head attention in the mid block and at ``attn_levels``) at any downsampling factor; with
``channel_mult [1, 1, 2, 2, 4]`` and attention at the lowest level it is VA-VAE's f16 decoder.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vfmbench import perf
from vfmbench.errors import MissingWeightsError, UserError, did_you_mean
from vfmbench.hookspecs import hookimpl
from vfmbench.interfaces import DiagonalGaussian, Phase, Tokenizer, to_float
from vfmbench.specs import DecoderSpec, TokenizerSpec
from vfmbench_plugins.layers import stage_channels
from vfmbench_plugins.recon_losses import ReconLoss, ReconLossArgs

SD_VAE_HUB = {"ft-ema": "stabilityai/sd-vae-ft-ema", "ft-mse": "stabilityai/sd-vae-ft-mse"}
SD_SCALING_FACTOR = 0.18215
NORMALISATIONS = ("scaling-factor", "per-channel")
TRAIN_MODULES = ("all", "decoder")
DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
LDM_PAPER = "Rombach et al. 2022, High-Resolution Image Synthesis with Latent Diffusion Models (arXiv 2112.10752)"


# ---------------------------------------------------------------------------------------------
# LDM encoder / decoder (diffusers' Encoder and Decoder, the LDM AutoencoderKL architecture)


def ldm_levels(downsample: int) -> int:
    """Number of downsampling steps of an f``downsample`` autoencoder (a power of two)."""
    levels = int(round(math.log2(downsample))) if downsample > 0 else -1
    if levels < 0 or 2**levels != downsample:
        raise UserError(f"downsample must be a power of two, got {downsample}")
    return levels


def ldm_channels(base: int, mult: list[int], downsample: int) -> list[int]:
    """Channels of each resolution level, full resolution first (``mult`` repeats its last entry)."""
    levels = ldm_levels(downsample)
    if len(mult) > levels + 1:
        raise UserError(f"channel_mult {mult} has {len(mult)} levels; an f{downsample} autoencoder has {levels + 1}")
    ch = stage_channels(base, mult, levels)
    bad = [c for c in ch if c % 32]
    if bad:
        raise UserError(f"LDM blocks use GroupNorm(32): every level's channels must be a multiple of 32, got {ch}")
    return ch


def set_diffusers_checkpointing(module: nn.Module, enabled: bool) -> None:
    """Gradient checkpointing of a diffusers ``Encoder``/``Decoder`` (their up/down/mid blocks),
    non-reentrant, as ``ModelMixin.enable_gradient_checkpointing`` sets it up for whole models."""
    module.gradient_checkpointing = bool(enabled)
    module._gradient_checkpointing_func = perf.checkpoint  # called as (block, *inputs)


class LdmSwitches:
    """``set_channels_last``/``set_grad_checkpointing`` for a module whose diffusers ``Encoder`` or
    ``Decoder`` is ``self.<_coder>``; inputs become NHWC and outputs contiguous again."""

    channels_last = False
    _coder = ""

    def set_channels_last(self, enabled: bool) -> None:
        self.channels_last = bool(enabled)
        perf.to_channels_last(self, enabled)

    def set_grad_checkpointing(self, enabled: bool) -> None:
        set_diffusers_checkpointing(getattr(self, self._coder), enabled)


def attention_levels(attn_levels: list[int], n: int) -> set[int]:
    """Level indices (0 = full resolution; negative counts from the lowest) as a set in [0, n)."""
    out = set()
    for lv in attn_levels:
        i = lv + n if lv < 0 else lv
        if not 0 <= i < n:
            raise UserError(f"attn_levels entry {lv} is out of range for {n} resolution levels")
        out.add(i)
    return out


class LdmEncoder(LdmSwitches, nn.Module):
    """Image in [-1, 1] -> 2 * latent_channels moments (mean | logvar): LDM's ``Encoder`` (double_z)
    followed by ``quant_conv``. State-dict keys are those of diffusers' ``AutoencoderKL``."""

    _coder = "encoder"

    def __init__(self, latent_channels: int, downsample: int, base: int, mult: list[int], blocks: int, attn_levels: list[int]):
        super().__init__()
        from diffusers.models.autoencoders.vae import Encoder

        ch = ldm_channels(base, mult, downsample)
        attn = attention_levels(attn_levels, len(ch))
        types = ["AttnDownEncoderBlock2D" if i in attn else "DownEncoderBlock2D" for i in range(len(ch))]
        self.encoder = Encoder(in_channels=3, out_channels=latent_channels, down_block_types=tuple(types), block_out_channels=tuple(ch),
                               layers_per_block=blocks, norm_num_groups=32, act_fn="silu", double_z=True, mid_block_add_attention=True)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quant_conv(self.encoder(perf.channels_last_input(x, self.channels_last)))
        return out.contiguous() if self.channels_last else out


class LdmDecoder(LdmSwitches, nn.Module):
    """Latent [B, C, h, w] -> image [B, 3, h*f, w*f] in about [-1, 1]: ``post_quant_conv`` then LDM's
    ``Decoder``. State-dict keys are those of diffusers' ``AutoencoderKL``."""

    _coder = "decoder"

    def __init__(self, latent_channels: int, downsample: int, base: int, mult: list[int], blocks: int, attn_levels: list[int]):
        super().__init__()
        from diffusers.models.autoencoders.vae import Decoder

        ch = ldm_channels(base, mult, downsample)
        attn = attention_levels(attn_levels, len(ch))
        # diffusers lists decoder blocks from the lowest resolution up
        types = ["AttnUpDecoderBlock2D" if (len(ch) - 1 - i) in attn else "UpDecoderBlock2D" for i in range(len(ch))]
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.decoder = Decoder(in_channels=latent_channels, out_channels=3, up_block_types=tuple(types), block_out_channels=tuple(ch),
                               layers_per_block=blocks, norm_num_groups=32, act_fn="silu", mid_block_add_attention=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self.post_quant_conv(perf.channels_last_input(z, self.channels_last)))
        return out.contiguous() if self.channels_last else out


# ---------------------------------------------------------------------------------------------
# The original LDM checkpoint layout -> diffusers' AutoencoderKL layout

# (LDM key pattern, diffusers key template). ``{up}`` is the decoder level counted from the lowest
# resolution (diffusers) instead of from the highest (LDM). Inside attention blocks the parameter
# names change as ATTN_PARAMS says, and the 1x1-conv q/k/v/proj_out weights become linear weights.
LDM_KEY_TABLE: tuple[tuple[str, str], ...] = (
    (r"^(encoder|decoder)\.conv_in\.(weight|bias)$", r"\1.conv_in.\2"),
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.(.+)$", r"encoder.down_blocks.\1.resnets.\2.\3"),
    (r"^encoder\.down\.(\d+)\.attn\.(\d+)\.(.+)$", r"encoder.down_blocks.\1.attentions.\2.\3"),
    (r"^encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)$", r"encoder.down_blocks.\1.downsamplers.0.conv.\2"),
    (r"^(encoder|decoder)\.mid\.block_1\.(.+)$", r"\1.mid_block.resnets.0.\2"),
    (r"^(encoder|decoder)\.mid\.block_2\.(.+)$", r"\1.mid_block.resnets.1.\2"),
    (r"^(encoder|decoder)\.mid\.attn_1\.(.+)$", r"\1.mid_block.attentions.0.\2"),
    (r"^(encoder|decoder)\.norm_out\.(weight|bias)$", r"\1.conv_norm_out.\2"),
    (r"^(encoder|decoder)\.conv_out\.(weight|bias)$", r"\1.conv_out.\2"),
    (r"^decoder\.up\.(\d+)\.block\.(\d+)\.(.+)$", r"decoder.up_blocks.{up}.resnets.\2.\3"),
    (r"^decoder\.up\.(\d+)\.attn\.(\d+)\.(.+)$", r"decoder.up_blocks.{up}.attentions.\2.\3"),
    (r"^decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)$", r"decoder.up_blocks.{up}.upsamplers.0.conv.\2"),
    (r"^(quant_conv|post_quant_conv)\.(weight|bias)$", r"\1.\2"),
)
RESNET_PARAMS = {"nin_shortcut": "conv_shortcut"}
ATTN_PARAMS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Parts of LDM training checkpoints that are not the autoencoder (the loss's LPIPS and discriminator).
LDM_IGNORED_PREFIXES = ("loss.",)


def ldm_to_diffusers_key(key: str, levels: int) -> str | None:
    """The diffusers ``AutoencoderKL`` key of an LDM autoencoder key (``levels`` resolution levels), or None."""
    for pattern, template in LDM_KEY_TABLE:
        m = re.match(pattern, key)
        if not m:
            continue
        up = levels - 1 - int(m.group(1)) if "{up}" in template else 0
        out = m.expand(template.replace("{up}", str(up)))
        head, _, param = out.rpartition(".")
        parts = head.split(".")
        if "attentions" in parts:
            parts[-1] = ATTN_PARAMS.get(parts[-1], parts[-1])
        elif "resnets" in parts:
            parts[-1] = RESNET_PARAMS.get(parts[-1], parts[-1])
        return ".".join(parts) + "." + param
    return None


def ldm_levels_of(state: dict[str, torch.Tensor]) -> int:
    """Number of resolution levels of an LDM autoencoder state dict (from its encoder.down.N keys)."""
    found = {int(m.group(1)) for k in state if (m := re.match(r"^encoder\.down\.(\d+)\.", k))}
    if not found:
        raise UserError("not an LDM autoencoder checkpoint: no 'encoder.down.N' keys")
    return max(found) + 1


def strip_to_autoencoder(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The autoencoder part of a checkpoint whose keys may carry a prefix (``first_stage_model.``, ``vae.``)."""
    anchor = next((k for k in state if k.endswith("encoder.conv_in.weight") and not k.endswith("decoder.conv_in.weight")), None)
    if anchor is None:
        raise UserError("not an autoencoder checkpoint: no 'encoder.conv_in.weight' key")
    prefix = anchor[: -len("encoder.conv_in.weight")]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def convert_ldm_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An LDM-layout autoencoder state dict -> (diffusers ``AutoencoderKL`` state dict, keys left unmapped).

    Keys under ``LDM_IGNORED_PREFIXES`` (training-only loss modules) are dropped silently.
    """
    state = strip_to_autoencoder(state)
    levels = ldm_levels_of(state)
    out, unmapped = {}, []
    for key, value in state.items():
        if key.startswith(LDM_IGNORED_PREFIXES):
            continue
        new = ldm_to_diffusers_key(key, levels)
        if new is None:
            unmapped.append(key)
            continue
        if ".attentions." in new and value.ndim == 4 and new.rsplit(".", 1)[1] == "weight" and not new.endswith("group_norm.weight"):
            value = value[:, :, 0, 0]
        out[new] = value
    return out, unmapped


def is_ldm_layout(state: dict[str, torch.Tensor]) -> bool:
    return any(re.search(r"(^|\.)encoder\.down\.\d+\.block\.", k) for k in state)


def load_into(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``module.load_state_dict(state)`` strictly, as a ``UserError`` naming ``what`` on mismatch."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise UserError(f"{what} does not match the configured architecture: {str(e).splitlines()[-1].strip()[:300]}") from None
    if missing or unexpected:
        raise UserError(
            f"{what} does not match the configured architecture: {len(missing)} missing keys {missing[:4]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:4]}; check the architecture arguments against the checkpoint"
        )


# ---------------------------------------------------------------------------------------------
# sd-vae


@dataclass
class SdVaeArgs:
    pretrained: str = ""  # '' = random init; ft-ema | ft-mse = the official weights; or a diffusers folder / LDM-layout file
    normalisation: str = "scaling-factor"  # scaling-factor: (z - shift) * scaling_factor of the weights' config | per-channel: runner statistics
    latent_channels: int = 4  # random init only (loaded weights bring their own config)
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])  # random init only
    layers_per_block: int = 2  # random init only
    scaling_factor: float = SD_SCALING_FACTOR  # random init only
    train_modules: str = "all"  # all | decoder (the ft-ema / ft-mse recipe fine-tuned the decoder only)
    loss: ReconLossArgs = field(default_factory=ReconLossArgs)


def sd_vae_config(args: SdVaeArgs) -> dict:
    n = len(args.block_out_channels)
    return dict(
        in_channels=3, out_channels=3, latent_channels=args.latent_channels, block_out_channels=tuple(args.block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=args.layers_per_block, norm_num_groups=32, act_fn="silu", sample_size=256,
        scaling_factor=args.scaling_factor,
    )


def _hf_cached_folder(repo: str) -> tuple[Path | None, str]:
    """The snapshot folder of ``repo`` in the Hugging Face cache when its config and weights are there (no network)."""
    from huggingface_hub import constants, try_to_load_from_cache

    cache = str(constants.HF_HUB_CACHE)
    cfg = try_to_load_from_cache(repo, "config.json", cache_dir=cache)
    if isinstance(cfg, str):
        for name in DIFFUSERS_WEIGHT_FILES:
            w = try_to_load_from_cache(repo, name, cache_dir=cache)
            if isinstance(w, str):
                return Path(cfg).parent, ""
    return None, f"Hugging Face cache {cache} (repo {repo}, config.json + {' or '.join(DIFFUSERS_WEIGHT_FILES)}): not there"


def resolve_sd_vae_weights(pretrained: str) -> Path:
    """A local folder or file for ``tokenizer.args.pretrained``: the path itself, else the cached hub folder, else a download."""
    from vfmbench.vfm import is_offline

    if pretrained not in SD_VAE_HUB:
        p = Path(pretrained).expanduser()
        if p.exists():
            return p
        raise MissingWeightsError(
            f"tokenizer.args.pretrained={pretrained!r} is neither {' nor '.join(SD_VAE_HUB)} nor an existing folder or file; "
            f"{did_you_mean(pretrained, SD_VAE_HUB)}"
        )
    repo = SD_VAE_HUB[pretrained]
    found, where = _hf_cached_folder(repo)
    if found is not None:
        return found
    looked = [where]
    if is_offline():
        looked.append("no download tried: HF_HUB_OFFLINE is set")
    else:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo, allow_patterns=["config.json", "*.safetensors"]))
        except Exception as e:  # any network or hub failure ends in the same actionable message
            looked.append(f"download of {repo}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    raise MissingWeightsError(
        f"weights of sd-vae {pretrained!r} ({repo}) were not found. Looked in:\n" + "".join(f"  - {w}\n" for w in looked)
        + f"Fetch them where the hub is reachable (`hf download {repo} config.json diffusion_pytorch_model.safetensors --local-dir DIR`), "
        "then pass `--set tokenizer.args.pretrained=DIR`; or leave tokenizer.args.pretrained empty to train from scratch."
    )


def load_sd_vae(args: SdVaeArgs, path: Path, cache_dir: Path | None = None):
    """(AutoencoderKL, weights id) from a diffusers folder or one LDM-layout weights file."""
    from diffusers import AutoencoderKL

    from vfmbench.vfm import load_weight_file, weight_files, weights_id

    if path.is_dir():
        if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            path = path / "vae"  # a whole Stable Diffusion pipeline folder
        if not (path / "config.json").is_file():
            raise UserError(f"{str(path)!r} is not a diffusers AutoencoderKL folder: it has no config.json")
        try:
            vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True, torch_dtype=torch.float32)
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"cannot load a diffusers AutoencoderKL from {str(path)!r}: {str(e).splitlines()[0][:300]}") from None
        files = [f for f in weight_files(path) if f.name.startswith("diffusion_pytorch_model")] or weight_files(path)
        return vae, weights_id([path / "config.json", *files], cache_dir)
    state = load_weight_file(path)
    if not is_ldm_layout(state):
        raise UserError(f"{str(path)!r} is not an LDM-layout autoencoder checkpoint; pass a diffusers folder (config.json + weights) instead")
    converted, unmapped = convert_ldm_state_dict(state)
    if unmapped:
        raise UserError(f"{str(path)!r}: keys outside the LDM autoencoder layout: {unmapped[:5]}")
    vae = AutoencoderKL(**sd_vae_config(args))
    load_into(vae, converted, f"LDM checkpoint {str(path)!r}")
    return vae, weights_id([path], cache_dir)


class SdVae(Tokenizer):
    """diffusers' AutoencoderKL behind the Tokenizer interface; see the module docstring."""

    channels_last = False

    def __init__(self, args: SdVaeArgs, vae: nn.Module, recon_loss: ReconLoss):
        cfg = vae.config
        super().__init__(cfg.latent_channels, 2 ** (len(cfg.block_out_channels) - 1))
        self.args = args
        self.vae = vae
        self.recon_loss = recon_loss
        self.scaling_factor = float(cfg.scaling_factor)
        shift = getattr(cfg, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0
        self.normalisation = args.normalisation
        if self.normalisation == "scaling-factor":
            self._fix_stats()

    def _fix_stats(self) -> None:
        self.latent_mean.fill_(self.shift_factor)
        self.latent_std.fill_(1.0 / self.scaling_factor)

    def set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-channel statistics from the runner; ignored (kept at the scaling factor) in ``scaling-factor`` mode."""
        if self.normalisation == "scaling-factor":
            self._fix_stats()
        else:
            super().set_latent_stats(mean, std)

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        dist = self.vae.encode(perf.channels_last_input(to_float(images), self.channels_last)).latent_dist
        return DiagonalGaussian(dist.mean.float().contiguous(), dist.logvar.float().contiguous())  # fp32 latent and KL under autocast

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(perf.channels_last_input(z, self.channels_last)).sample.contiguous()

    # -- precision and speed switches (vfmbench.perf) --
    def set_grad_checkpointing(self, enabled: bool) -> None:
        set_diffusers_checkpointing(self.vae.encoder, enabled)
        set_diffusers_checkpointing(self.vae.decoder, enabled)

    def set_channels_last(self, enabled: bool) -> None:
        self.channels_last = bool(enabled)
        perf.to_channels_last(self.vae, enabled)

    def compile_targets(self) -> list[nn.Module]:
        return [self.vae.encoder, self.vae.decoder]

    def training_phases(self, lr: float) -> list[Phase]:
        module = self.vae if self.args.train_modules == "all" else nn.ModuleList([self.vae.decoder, self.vae.post_quant_conv])
        params = [p for p in module.parameters() if p.requires_grad]
        return [Phase("g", params, lr, betas=(0.5, 0.9))]  # LDM's autoencoder optimiser

    def phase_loss(self, phase, images, labels, nimg):
        target = to_float(images)
        if self.args.train_modules == "decoder":
            with torch.no_grad():
                post = self.encode(images)
        else:
            post = self.encode(images)
        recon = self.decode(post.sample())
        terms = self.recon_loss(recon, target, post if self.args.train_modules == "all" else None)
        return terms.total, terms.logs


def build_sd_vae(args: SdVaeArgs, ctx) -> SdVae:
    from diffusers import AutoencoderKL

    if args.normalisation not in NORMALISATIONS:
        raise UserError(f"tokenizer.args.normalisation={args.normalisation!r}: {did_you_mean(args.normalisation, NORMALISATIONS)}")
    if args.train_modules not in TRAIN_MODULES:
        raise UserError(f"tokenizer.args.train_modules={args.train_modules!r}: {did_you_mean(args.train_modules, TRAIN_MODULES)}")
    weights = "random-init"
    if args.pretrained and not ctx.meta:
        vae, weights = load_sd_vae(args, resolve_sd_vae_weights(args.pretrained), ctx.cache_dir)
    else:
        config = sd_vae_config(args)
        p = Path(args.pretrained).expanduser() if args.pretrained and args.pretrained not in SD_VAE_HUB else None
        if p is not None and (p / "config.json").is_file():  # dry run of a folder: its architecture, no weights
            config = AutoencoderKL.load_config(str(p))
            vae = AutoencoderKL.from_config(config)
        else:
            vae = AutoencoderKL(**config)
    tok = SdVae(args, vae, ReconLoss.from_context(args.loss, ctx))
    tok.weights_id = weights if args.pretrained and not ctx.meta else "trained"
    return tok


# ---------------------------------------------------------------------------------------------
# ldm-decoder


@dataclass
class LdmDecoderArgs:
    base_channels: int = 128  # LDM 'ch'
    channel_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])  # per level, full resolution first (VA-VAE f16)
    blocks: int = 2  # LDM 'num_res_blocks' (the decoder has one more per level)
    attn_levels: list[int] = field(default_factory=lambda: [-1])  # levels with attention besides the mid block (-1 = lowest)


def build_ldm_decoder(args: LdmDecoderArgs, latent_channels: int, downsample: int) -> LdmDecoder:
    return LdmDecoder(latent_channels, downsample, args.base_channels, args.channel_mult, args.blocks, args.attn_levels)


@hookimpl
def register_tokenizers(register):
    register(
        TokenizerSpec(
            name="sd-vae",
            description="LDM AutoencoderKL kl-f8 through diffusers: official sd-vae-ft-ema/-ft-mse weights or trained from scratch",
            factory=build_sd_vae,
            config=SdVaeArgs,
            version="1",
            source="https://huggingface.co/stabilityai/sd-vae-ft-ema (diffusers AutoencoderKL)",
            paper=LDM_PAPER,
            license="MIT (weights: CreativeML OpenRAIL-M)",
            latent_channels=4,
            downsample=8,
            uses_vfm=False,
            uses_decoder=False,
            default_decoder="",
            normalisation="scaling-factor",
        )
    )


@hookimpl
def register_decoders(register):
    register(
        DecoderSpec(
            name="ldm-decoder",
            description="LDM AutoencoderKL decoder (post_quant_conv, ResNet levels, nearest upsampling, single-head attention); VA-VAE f16 by default",
            factory=build_ldm_decoder,
            config=LdmDecoderArgs,
            version="1",
            source="diffusers Decoder (the LDM architecture)",
            paper=LDM_PAPER,
            license="Apache-2.0",
        )
    )
