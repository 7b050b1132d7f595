"""``sit``: SiT (Ma et al. 2024) by linear flow matching, with optional REPA or REG alignment to a VFM.

Architecture (``dit_blocks.FlowTransformer``), as REG's / REPA's ``models/sit.py``: DiT blocks
(LayerNorm, GELU(tanh) MLP, adaLN-Zero), timm's LayerNorm QK-norm (weight and bias), fixed sin-cos
position embedding, patch 1 or 2. The network itself (``reference``) runs in SiT's convention: it
embeds the noise level ``tau = 1 - t`` and predicts ``noise - data``; ``forward`` presents it in
vfmbench's (t = 0 noise, v = data - noise), so released weights load unchanged. Objective:
``x_t = (1 - t) eps + t x``, target ``v = x - eps``, per-sample MSE ("denoise").

``align`` (``diffusion.args.align``):

* ``none``: plain SiT.
* ``repa`` (Yu et al. 2025): block ``align_depth``'s hidden states go through an MLP projector
  (``width -> projector_dim -> projector_dim -> align_dim``, SiLU) and are aligned token by token
  with the alignment VFM's patch tokens of the clean image by negative cosine similarity,
  averaged over tokens: ``proj = -mean_n cos(h_n, y_n)``; loss ``denoise + proj_coeff * proj``.
* ``reg`` (Wu et al. 2025): REPA plus the VFM's class token ``c`` as an extra input token, noised
  along the same path at the same t with its own noise, ``c_t = (1 - t) eps_c + t c``, projected to
  the width by a linear layer and an affine LayerNorm (REG's ``cls_projectors2``, ``wg_norm``) and
  prepended to the patch tokens (it gets no position embedding: REG's row 0 is zero).
  Its velocity ``c - eps_c`` is predicted from the final layer's class-token features by a linear
  head and trained with its own MSE: loss ``denoise + proj_coeff * proj + cls_coeff * cls``. The
  REPA term then aligns the class-token position too (with ``c``). Sampling integrates the latent
  and the class token jointly (``joint_dim``; ``vfmbench.sampling.sample``), guidance acting on both.

The alignment VFM (``align_vfm``, tokens of layer ``align_vfm_layer`` resampled to the model's token
grid, and for REG its class token) is computed by the runner through ``vfmbench.alignment`` from the
request ``alignment_request()`` and passed to ``phase_loss`` as ``align_tokens`` [B, N, align_dim] and
``align_cls`` [B, align_dim]. SiT-XL/1 + REG with DINOv2-B (align_dim 768) has 684,766,240 parameters,
the reference module's count. REG trains without horizontal flips (``hflip=False`` in the preset).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vfmbench.errors import UserError, did_you_mean
from vfmbench.hookspecs import hookimpl
from vfmbench.specs import DiffusionSpec
from vfmbench_plugins.diffusion.dit_blocks import FlowArgs, FlowTransformer, interpolate, mse_per_sample

ALIGNS = ("none", "repa", "reg")
FEATURE_SOURCES = ("cache", "online")


@dataclass
class SiTArgs(FlowArgs):
    align: str = "none"  # none | repa | reg
    align_vfm: str = "dinov2-b14"  # a registered VFM (REPA/REG: DINOv2-B/14)
    align_vfm_weights: str = ""  # its weights file or folder outside smoke runs ('' = the library cache)
    align_vfm_layer: int = -1  # VFM layer of the target tokens (-1 = final normed output)
    align_dim: int = 768  # the VFM's width (DINOv2-B 768; the tiny smoke VFMs 64)
    align_depth: int = 8  # the block whose output is projected (REPA/REG: 8)
    projector_dim: int = 2048
    proj_coeff: float = 0.5
    cls_coeff: float = 0.03  # REG's class-token velocity loss weight
    align_features: str = "cache"  # cache (computed once, kept in memory) | online (computed per batch)


def projector(width: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out))


def negative_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample ``-mean_n cos(pred_n, target_n)`` over tokens n of [B, N, D] tensors."""
    return -(F.normalize(pred.float(), dim=-1) * F.normalize(target.float(), dim=-1)).sum(-1).mean(1)


class SiT(FlowTransformer):
    """SiT velocity model on normalised latents [B, C, H, W]; label ``num_classes`` is unconditional.

    With ``align='reg'`` ``forward(x, t, labels, joint=c_t)`` returns ``(v, v_cls)``; ``joint_dim`` is
    the class token's width (0 otherwise).
    """

    reference_renames = (  # REG/REPA SiT names (Martinser/REG models/sit.py, sihyun-yu/REPA models/sit.py)
        (r"^final_layer\.linear_cls\.", "cls_out."),
        (r"^cls_projectors2\.", "cls_in."),
        (r"^wg_norm\.", "cls_norm."),
        (r"^projectors\.0\.", "projector."),
    )

    def __init__(self, args: SiTArgs, latent_shape: tuple[int, int, int], num_classes: int):
        super().__init__(args, latent_shape, num_classes, swiglu=False, rmsnorm=False, rope=False, name="sit")
        if args.align not in ALIGNS:
            raise UserError(f"unknown diffusion.args.align {args.align!r}: {did_you_mean(args.align, ALIGNS)}")
        if args.align_features not in FEATURE_SOURCES:
            raise UserError(f"unknown diffusion.args.align_features {args.align_features!r}: {did_you_mean(args.align_features, FEATURE_SOURCES)}")
        if args.align != "none":
            if not 1 <= args.align_depth <= self.depth:
                raise UserError(f"diffusion.args.align_depth={args.align_depth} must be a block index in 1..{self.depth}")
            if args.align_dim < 1 or args.projector_dim < 1:
                raise UserError("diffusion.args.align_dim and projector_dim must be positive")
            if args.proj_coeff < 0 or args.cls_coeff < 0:
                raise UserError("diffusion.args.proj_coeff and cls_coeff must be >= 0")
            self.projector = projector(self.width, args.projector_dim, args.align_dim)
        self.joint_dim = args.align_dim if args.align == "reg" else 0
        if self.joint_dim:  # REG: Linear then an affine LayerNorm (cls_projectors2, wg_norm) in, linear_cls out
            self.cls_in = nn.Linear(args.align_dim, self.width)
            self.cls_norm = nn.LayerNorm(self.width, eps=1e-6)
            self.cls_out = nn.Linear(self.width, args.align_dim)
        self.init_weights()
        if self.joint_dim:  # the untrained model predicts v = 0 for the class token too
            nn.init.zeros_(self.cls_out.weight)
            nn.init.zeros_(self.cls_out.bias)

    # -- forward --
    def run(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, joint: torch.Tensor | None = None,
            capture: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(v [B, C, H, W], v_cls [B, align_dim] or None, hidden states after block ``align_depth`` or None)
        in vfmbench's convention (t = 0 noise, v = data - noise): ``reference(x, 1 - t)`` with the
        velocities negated."""
        v, v_cls, hidden = self.reference(x, 1 - torch.as_tensor(t, device=x.device), labels, joint, capture)
        return -v, (-v_cls if v_cls is not None else None), hidden

    def reference(self, x: torch.Tensor, tau: torch.Tensor, labels: torch.Tensor, joint: torch.Tensor | None = None,
                  capture: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The network in SiT/REPA/REG's own convention: ``tau`` is the noise level (1 = noise, 0 = data),
        embedded as it is, and the velocities are noise - data (REG's ``SiT.forward``). Returns
        (v, v_cls or None, hidden states after block ``align_depth`` or None; their projection is REG's zs)."""
        if self.joint_dim and joint is None:
            raise ValueError("sit with align='reg' models the class token jointly: pass joint=[B, align_dim], the noisy "
                             "class token at t (vfmbench.sampling.sample does this through the model's joint_dim)")
        if not self.joint_dim and joint is not None:
            raise ValueError("this sit model has no class token (align != 'reg'); do not pass joint")
        tokens = self.embed(x)
        if self.joint_dim:
            tokens = torch.cat([self.cls_norm(self.cls_in(joint.to(tokens.dtype)))[:, None], tokens], dim=1)
        c = self.condition(tau, labels, x.shape[0])
        hidden = None
        for i, blk in enumerate(self.blocks, 1):
            tokens = self.run_block(blk, tokens, c)
            if capture and i == self.args.align_depth:
                hidden = tokens
        feats = self.final.features(tokens, c)
        p = 1 if self.joint_dim else 0
        v = self.unpatchify(self.final.linear(feats[:, p:]))
        v_cls = self.cls_out(feats[:, 0]) if self.joint_dim else None
        return v, v_cls, hidden

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, joint: torch.Tensor | None = None):
        """Velocity at (x, t); with REG also the class token's velocity: ``(v, v_cls)``."""
        v, v_cls, _ = self.run(x, t, labels, joint)
        return (v, v_cls) if self.joint_dim else v

    # -- alignment --
    def alignment_request(self) -> dict[str, Any] | None:
        """What the runner must provide as ``align_tokens``/``align_cls`` extras (None without alignment)."""
        a = self.args
        if a.align == "none":
            return None
        return {"vfm": a.align_vfm, "layer": a.align_vfm_layer, "prefix": a.align == "reg", "weights": a.align_vfm_weights,
                "dim": a.align_dim, "grid": list(self.grid), "features": a.align_features}

    # -- training --
    def loss_terms(self, latents: torch.Tensor, labels: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                   align_tokens: torch.Tensor | None = None, align_cls: torch.Tensor | None = None,
                   cls_eps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-sample ``denoise`` (MSE), ``proj`` (negative cosine) and ``cls`` (class-token MSE) at the given draws."""
        a = self.args
        if a.align != "none":
            n = self.grid[0] * self.grid[1]
            if align_tokens is None or align_tokens.shape[1:] != (n, a.align_dim):
                got = None if align_tokens is None else tuple(align_tokens.shape)
                raise ValueError(f"sit with align={a.align!r} needs align_tokens [B, {n}, {a.align_dim}] (the runner's alignment extras), got {got}")
        if self.joint_dim and (align_cls is None or cls_eps is None):
            raise ValueError("sit with align='reg' needs align_cls [B, align_dim] and its noise cls_eps")
        cls_t = interpolate(align_cls, cls_eps, t) if self.joint_dim else None
        v, v_cls, hidden = self.run(interpolate(latents, eps, t), t, labels, cls_t, capture=a.align != "none")
        terms = {"denoise": mse_per_sample(v, latents - eps)}
        if a.align != "none":
            target = torch.cat([align_cls[:, None], align_tokens], dim=1) if self.joint_dim else align_tokens
            terms["proj"] = negative_cosine(self.projector(hidden), target)
        if self.joint_dim:
            terms["cls"] = mse_per_sample(v_cls, align_cls - cls_eps)
        return terms

    def phase_loss(self, phase: str, latents: torch.Tensor, labels: torch.Tensor, nimg: int,
                   align_tokens: torch.Tensor | None = None, align_cls: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        if phase != "diffusion":
            raise ValueError(f"sit has one phase, 'diffusion'; got {phase!r}")
        t, eps, labels_in = self.draw_training_noise(latents, labels, nimg)
        cls_eps = torch.randn_like(align_cls) if self.joint_dim and align_cls is not None else None
        terms = {k: v.mean() for k, v in self.loss_terms(latents, labels_in, t, eps, align_tokens, align_cls, cls_eps).items()}
        loss = terms["denoise"]
        if "proj" in terms:
            loss = loss + self.args.proj_coeff * terms["proj"]
        if "cls" in terms:
            loss = loss + self.args.cls_coeff * terms["cls"]
        return loss, {k: float(v.detach()) for k, v in terms.items()}


def factory(args: SiTArgs | None, latent_shape: tuple[int, int, int], num_classes: int) -> SiT:
    return SiT(args if args is not None else SiTArgs(), latent_shape, num_classes)


@hookimpl
def register_diffusion_models(register):
    register(
        DiffusionSpec(
            name="sit",
            description="SiT by linear flow matching, optionally with REPA (projector alignment) or REG (VFM class token) to a VFM",
            factory=factory,
            config=SiTArgs,
            version="2",
            source="re-implementation in vfmbench, checked against Martinser/REG @ 021ea2e / tianciB/VFM-VAE tools/preprocess_for_reg/sit.py (golden fixture)",
            paper="SiT: arXiv 2401.08740; REPA: arXiv 2410.06940; REG: arXiv 2507.01467",
            license="Apache-2.0",
        )
    )
