"""Plugin: ``va-vae``, the vision-foundation-model aligned VAE (Yao & Wang 2025, LightningDiT).

An LDM AutoencoderKL at f16d32: the LDM encoder (``ch`` 128, ``ch_mult`` [1, 1, 2, 2, 4], two
ResNet blocks per level, single-head attention at the lowest level and in the mid block) gives a
diagonal Gaussian; the decoder is ``--decoder`` (default ``ldm-decoder``, the matching LDM
decoder). Training adds the VF alignment loss against a frozen teacher chosen with ``--vfm``
(DINOv2-L in VA-VAE; the ``paper-va-vae`` preset sets it):

* the sampled latent z goes through a 1x1 projection (no bias) to the teacher's width;
* the teacher's final-layer tokens (``teacher_layer``) are average-pooled onto the latent grid;
* L_vf = weight_dm * mean ReLU(|C(z') - C(f)| - margin_dm) + weight_cos * mean ReLU(1 - margin_cos - cos(z'_p, f_p))
  (``vfmbench_plugins.losses.vf_loss``; C = per-image cosine-similarity matrix of positions);
* with ``adaptive_vf`` its weight is vf_weight * ||dL_rec/dW|| / ||dL_vf/dW|| at W = the
  encoder's last layer (``quant_conv``), detached (``losses.adaptive_weight``).

L = L1 + LPIPS + KL (``vfmbench_plugins.recon_losses``) + lambda_vf * L_vf. The teacher is under
``frozen_prefixes``: it gets no gradient and is never saved with the tokenizer.

**Released weights** (``tokenizer.args.pretrained``): a VA-VAE checkpoint in the LDM layout
(``state_dict`` holding ``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``;
``loss.*`` is ignored; a VF projection is loaded when a 1x1 weight of the right shape is found)
is mapped through ``sd_vae.LDM_KEY_TABLE`` into the encoder and the ``ldm-decoder``. What was
verified offline is documented in docs/tokenizers.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vfmbench.errors import MissingWeightsError, UserError
from vfmbench.hookspecs import hookimpl
from vfmbench.specs import TokenizerSpec
from vfmbench_plugins.losses import adaptive_weight, vf_loss
from vfmbench_plugins.recon_losses import ReconLoss, ReconLossArgs
from vfmbench_plugins.tokenizers.sd_vae import LdmDecoder, convert_ldm_state_dict, is_ldm_layout, load_into
from vfmbench_plugins.tokenizers.teacher_vae import TOKENIZER_FIELDS, TeacherVae, TeacherVaeArgs, teacher_and_decoder

VA_VAE_PAPER = "Yao & Wang 2025, Reconstruction vs. Generation: Taming Optimization Dilemma in Latent Diffusion Models (arXiv 2501.01423)"
# Names a VF projection may have in a released checkpoint (the first one present with a 1x1 weight of shape [D, C(, 1, 1)] is used).
PROJECTION_KEYS = ("linear_proj.weight", "vf_proj.weight", "proj.weight")


@dataclass
class VaVaeArgs(TeacherVaeArgs):
    vf_weight: float = 0.1  # VA-VAE's w_hyper
    adaptive_vf: bool = True  # scale by the gradient-norm ratio at the encoder's last layer
    margin_cos: float = 0.5  # VA-VAE m1
    margin_dm: float = 0.25  # VA-VAE m2
    weight_cos: float = 1.0
    weight_dm: float = 1.0
    pretrained: str = ""  # released VA-VAE checkpoint (LDM layout); '' = train from scratch
    loss: ReconLossArgs = field(default_factory=ReconLossArgs)


class VaVae(TeacherVae):
    def __init__(self, args: VaVaeArgs, vfm, decoder: nn.Module, recon_loss: ReconLoss):
        super().__init__(args, vfm, decoder, recon_loss)
        self.vf_proj = nn.Conv2d(args.latent_channels, vfm.embed_dim, 1, bias=False)

    def alignment(self, images: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        a = self.args
        feats = self.teacher_features(images, z)
        return vf_loss(self.vf_proj(z), feats, margin_dm=a.margin_dm, margin_cos=a.margin_cos, weight_dm=a.weight_dm, weight_cos=a.weight_cos)

    def phase_loss(self, phase, images, labels, nimg):
        a = self.args
        z, terms = self.reconstruction(images)
        logs = dict(terms.logs)
        loss = terms.total
        if a.vf_weight > 0:
            vf, vf_logs = self.alignment(images, z)
            if a.adaptive_vf:
                lam = adaptive_weight(terms.rec, vf, self.encoder.quant_conv.weight, a.vf_weight)
            else:
                lam = torch.tensor(a.vf_weight, device=vf.device)
            loss = loss + lam * vf
            logs.update(vf_logs, vf=float(vf.detach()), vf_lambda=float(lam))
        return loss, logs


def load_released(tok: VaVae, path: Path, cache_dir: Path | None = None) -> str:
    """Load a released VA-VAE checkpoint (LDM layout) into ``tok``; returns its weights id."""
    from vfmbench.vfm import load_weight_file, weights_id

    if not path.exists():
        raise MissingWeightsError(
            f"tokenizer.args.pretrained={str(path)!r} does not exist; download the released VA-VAE checkpoint "
            "(hustvl/vavae-imagenet256-f16d32-dinov2 on the Hugging Face hub) and pass its path"
        )
    state = load_weight_file(path)
    if not is_ldm_layout(state):
        raise UserError(f"{str(path)!r} is not in the LDM autoencoder layout (no 'encoder.down.N.block' keys)")
    proj = next((state[k] for k in PROJECTION_KEYS if k in state), None)
    converted, unmapped = convert_ldm_state_dict(state)
    unmapped = [k for k in unmapped if k not in PROJECTION_KEYS]
    if unmapped:
        raise UserError(f"{str(path)!r}: keys outside the LDM autoencoder layout: {unmapped[:5]}")
    enc = {k: v for k, v in converted.items() if k.startswith(("encoder.", "quant_conv."))}
    dec = {k: v for k, v in converted.items() if k.startswith(("decoder.", "post_quant_conv."))}
    load_into(tok.encoder, enc, f"VA-VAE checkpoint {str(path)!r} (encoder)")
    if not isinstance(tok.decoder, LdmDecoder):
        raise UserError(f"VA-VAE checkpoint {str(path)!r} holds an LDM decoder; use --decoder ldm-decoder (or no --decoder) to load it")
    load_into(tok.decoder, dec, f"VA-VAE checkpoint {str(path)!r} (decoder; set component_args ldm-decoder to its architecture)")
    if proj is not None and proj.reshape(proj.shape[0], -1).shape == tok.vf_proj.weight.shape[:2]:
        tok.vf_proj.weight.data.copy_(proj.reshape(tok.vf_proj.weight.shape))
    return weights_id([path], cache_dir)


def build(args: VaVaeArgs, ctx) -> VaVae:
    vfm, decoder = teacher_and_decoder(args, ctx)
    tok = VaVae(args, vfm, decoder, ReconLoss.from_context(args.loss, ctx))
    if args.pretrained and not ctx.meta:
        tok.weights_id = load_released(tok, Path(args.pretrained).expanduser(), ctx.cache_dir)
    return tok


@hookimpl
def register_tokenizers(register):
    register(
        TokenizerSpec(
            name="va-vae",
            description="VA-VAE: LDM f16d32 VAE aligned to a frozen VFM teacher (--vfm, DINOv2 in the paper) by the VF loss",
            factory=build,
            config=VaVaeArgs,
            version="1",
            source="https://github.com/hustvl/LightningDiT (re-implemented from the paper's description)",
            paper=VA_VAE_PAPER,
            **TOKENIZER_FIELDS,
        )
    )
