"""The runner: one combination of tokenizer, VFM, decoder and diffusion model, stage by stage.

Stages: tokenizer (train or load) -> recon-eval -> latents (cache + statistics) -> probe ->
diffusion (train on cached latents) -> sample -> gen-eval -> results. Each stage writes into its
own folder of the run directory and marks itself done; re-running the same command skips finished
stages and continues an interrupted one from its last checkpoint.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import __version__
from .build import BuildContext, build_diffusion, build_tokenizer, decoder_name, default_cache_dir, param_counts, resolve_device
from .checkpoint import load_torch, save_torch, write_json
from .config import STAGES, RunConfig, config_hash
from .dist import is_main
from .errors import UserError
from .evaluate import Evaluator
from .images import plot_curves, save_grid, save_pairs
from .interfaces import Tokenizer
from .plugins import Host
from .results import SCHEMA_VERSION, write_rows
from .train import IndexStream, train_loop

# Stages that run on every rank under torchrun (the others run on rank 0).
PARALLEL_STAGES = ("tokenizer", "diffusion")

# Config keys that do not change what a run computes (excluded from the run directory's hash).
NON_RESULT_KEYS = {("run", "stages"), ("run", "out"), ("run", "num_threads"), ("run", "cache_dir"), ("metrics", "batch_size")}


def log(msg: str) -> None:
    print(f"[vfmbench] {msg}", file=sys.stderr, flush=True)


def git_hash() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _result_dict(cfg: RunConfig, uses_vfm: bool = True) -> dict[str, Any]:
    d = cfg.to_dict()
    for section, key in NON_RESULT_KEYS:
        d[section].pop(key, None)
    if not uses_vfm:  # the VFM axis of a sweep does not change a tokenizer that has no VFM
        d["vfm"].pop("name", None)
        d["vfm"].pop("weights", None)
        d["vfm"].pop("layers", None)
    return d


def run_name(host: Host, cfg: RunConfig) -> str:
    """Directory name derived from the config: readable components plus a hash of the rest."""
    tok = host.tokenizers.get(cfg.tokenizer.name)
    parts = [tok.name]
    if tok.uses_vfm:
        parts.append(host.vfms.canonical(cfg.vfm.name))
    dec = decoder_name(host, cfg)
    if dec and dec != tok.default_decoder:
        parts.append(dec)
    parts += [host.diffusion.canonical(cfg.diffusion.name), f"{host.datasets.canonical(cfg.data.dataset)}{cfg.data.resolution}"]
    return "-".join(parts) + "-" + config_hash(_result_dict(cfg, tok.uses_vfm), 8)


def validate(host: Host, cfg: RunConfig) -> None:
    """Resolve every name and argument section before anything is written."""
    from .build import component_args
    from .config import validate_args

    tok = host.tokenizers.get(cfg.tokenizer.name)
    validate_args(tok.config, component_args(cfg, tok.name, cfg.tokenizer.args), "tokenizer.args")
    if tok.uses_vfm:
        host.vfms.get(cfg.vfm.name)
    if cfg.vfm.size not in ("full", "tiny"):
        raise UserError(f"vfm.size must be 'full' or 'tiny', got {cfg.vfm.size!r}")
    if tok.uses_decoder:
        dec = host.decoders.get(cfg.decoder.name or tok.default_decoder)
        validate_args(dec.config, component_args(cfg, dec.name, cfg.decoder.args), "decoder.args")
    elif cfg.decoder.name:
        raise UserError(f"tokenizer {tok.name!r} has a fixed decoder; remove --decoder")
    diff = host.diffusion.get(cfg.diffusion.name)
    validate_args(diff.config, component_args(cfg, diff.name, cfg.diffusion.args), "diffusion.args")
    host.datasets.get(cfg.data.dataset)
    if cfg.metrics.reference and not Path(cfg.metrics.reference).is_file():
        raise UserError(f"metrics.reference={cfg.metrics.reference!r} does not exist; pass an ADM reference batch .npz (or '' for the val split)")
    for m in cfg.metrics.names:
        host.metrics.get(m)
    s = cfg.diffusion.sample
    if s.label_sampling not in ("random", "balanced"):
        raise UserError(f"diffusion.sample.label_sampling must be 'random' or 'balanced', got {s.label_sampling!r}")
    if len(s.cfg_interval) != 2 or not 0.0 <= s.cfg_interval[0] <= s.cfg_interval[1] <= 1.0:
        raise UserError(f"diffusion.sample.cfg_interval must be [t_low, t_high] within [0, 1], got {s.cfg_interval}")
    if cfg.vfm.cache_features not in ("auto", "always", "never"):
        raise UserError(f"vfm.cache_features must be auto, always or never, got {cfg.vfm.cache_features!r}")
    if cfg.run.precision not in ("fp32", "bf16"):
        raise UserError(f"run.precision must be 'fp32' or 'bf16', got {cfg.run.precision!r}")
    if cfg.data.resolution % tok_downsample(host, cfg) != 0:
        raise UserError(
            f"data.resolution={cfg.data.resolution} is not a multiple of the tokenizer's downsampling "
            f"factor {tok_downsample(host, cfg)}"
        )


def tok_downsample(host: Host, cfg: RunConfig) -> int:
    from .build import component_args

    tok = host.tokenizers.get(cfg.tokenizer.name)
    args = component_args(cfg, tok.name, cfg.tokenizer.args)
    return int(args.get("downsample", tok.downsample))


@dataclass
class Run:
    """One combination's run directory and its stages."""

    host: Host
    cfg: RunConfig
    run_dir: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _ctx: BuildContext | None = None
    _tokenizer: Tokenizer | None = None
    _datasets: dict[str, Any] = field(default_factory=dict)
    _evaluator: Evaluator | None = None
    feature_stats: Any = None  # vfmbench.feature_cache.CacheStats of this run

    # -- setup --------------------------------------------------------------------------------
    @classmethod
    def prepare(cls, host: Host, cfg: RunConfig) -> "Run":
        validate(host, cfg)
        run_dir = Path(cfg.run.out) / run_name(host, cfg)
        run = cls(host=host, cfg=cfg, run_dir=run_dir, device=resolve_device(cfg.run.device))
        run._preflight()
        return run

    def __post_init__(self) -> None:
        from .feature_cache import CacheStats

        self.feature_stats = CacheStats()

    def _preflight(self) -> None:
        """Everything that can fail on bad input, before the run directory exists."""
        stages = set(self.cfg.run.stages)
        self.dataset("val")
        if stages & {"tokenizer", "diffusion", "latents", "probe"}:
            self.dataset("train")
        if self.cfg.tokenizer.weights and not Path(self.cfg.tokenizer.weights).exists():
            raise UserError(f"tokenizer.weights={self.cfg.tokenizer.weights!r} does not exist; pass a model.pt written by a previous run")
        spec = self.host.tokenizers.get(self.cfg.tokenizer.name)
        if spec.uses_vfm:
            self.ctx().vfm()  # resolves (and loads) the VFM weights, or fails with where it looked
        if stages & {"recon-eval", "gen-eval"}:
            self.evaluator().check_weights()

    def ctx(self) -> BuildContext:
        if self._ctx is None:
            self._ctx = BuildContext(host=self.host, config=self.cfg, device=self.device)
        return self._ctx

    def dataset(self, split: str):
        if split not in self._datasets:
            spec = self.host.datasets.get(self.cfg.data.dataset)
            if split not in spec.splits:
                raise UserError(f"dataset {spec.name!r} has no {split!r} split (it has {', '.join(spec.splits)})")
            self._datasets[split] = spec.factory(self.cfg.data, split)
        return self._datasets[split]

    def evaluator(self) -> Evaluator:
        if self._evaluator is None:
            self._evaluator = Evaluator(self.host, self.cfg, self.device, default_cache_dir(self.cfg))
        return self._evaluator

    @property
    def num_classes(self) -> int:
        return int(getattr(self.dataset("train" if "train" in self._datasets else "val"), "num_classes"))

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def is_done(self, stage: str) -> bool:
        return (self.stage_dir(stage) / "done.json").exists()

    def mark_done(self, stage: str, info: dict[str, Any]) -> None:
        write_json(self.stage_dir(stage) / "done.json", {"stage": stage, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **info})

    def write_config(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(
            self.run_dir / "config.json",
            {
                "config": self.cfg.to_dict(),
                "run_name": self.run_dir.name,
                "versions": {
                    "vfmbench": __version__,
                    "torch": torch.__version__,
                    "python": platform.python_version(),
                    "git": git_hash(),
                    "plugins": self.host.versions(),
                    "components": self.component_versions(),
                },
            },
        )

    def component_versions(self) -> dict[str, Any]:
        h, c = self.host, self.cfg
        tok = h.tokenizers.get(c.tokenizer.name)
        out = {
            "tokenizer": [tok.name, tok.version],
            "diffusion": [h.diffusion.get(c.diffusion.name).name, h.diffusion.get(c.diffusion.name).version],
            "dataset": [h.datasets.get(c.data.dataset).name, h.datasets.get(c.data.dataset).version],
        }
        if tok.uses_vfm:
            v = h.vfms.get(c.vfm.name)
            out["vfm"] = [v.name, v.version]
        dec = decoder_name(h, c)
        if dec:
            out["decoder"] = [dec, h.decoders.get(dec).version]
        return out

    # -- components -----------------------------------------------------------------------------
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            torch.manual_seed(self.cfg.run.seed)
            tok = build_tokenizer(self.ctx()).to(self.device)
            model_path = self.stage_dir("tokenizer") / "model.pt"
            if model_path.exists():
                self._load_tokenizer_state(tok, load_torch(model_path, self.device))
            stats = self.stage_dir("latents") / "stats.pt"
            if stats.exists():
                s = load_torch(stats, self.device)
                tok.set_latent_stats(s["mean"], s["std"])
            tok.eval()
            self._tokenizer = tok
        return self._tokenizer

    @staticmethod
    def _load_tokenizer_state(tok: Tokenizer, state: dict) -> None:
        missing, unexpected = tok.load_state_dict(state, strict=False)
        bad_missing = [k for k in missing if not k.startswith(tok.frozen_prefixes)]
        if unexpected or bad_missing:
            raise UserError(
                f"tokenizer weights do not match {tok.spec.name!r}: missing {bad_missing[:5]}, unexpected {unexpected[:5]}; "
                "check tokenizer.args against the run that wrote them"
            )

    def _image_batch(self, split: str, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ds = self.dataset(split)
        ids = [int(i) for i in idx]
        items = ds.__getitems__(ids) if hasattr(ds, "__getitems__") else [ds[i] for i in ids]
        images = torch.stack([x for x, _ in items]).to(self.device)
        labels = torch.tensor([int(y) for _, y in items], dtype=torch.long, device=self.device)
        return images, labels

    def _iter_split(self, split: str, n: int, desc: str):
        ds = self.dataset(split)
        n = min(n, len(ds)) if n else len(ds)
        bs = self.cfg.metrics.batch_size
        for start in tqdm(range(0, n, bs), desc=desc, unit="batch", leave=False, dynamic_ncols=True):
            yield self._image_batch(split, torch.arange(start, min(start + bs, n)))

    # -- stages ---------------------------------------------------------------------------------
    def execute(self) -> Path:
        """Run the configured stages. Under torchrun the training stages run data-parallel on every
        rank; the other stages run on rank 0 while the others wait; only rank 0 writes."""
        from . import dist

        if dist.is_main():
            self.write_config()
        dist.barrier()
        t_all = time.time()
        for stage in STAGES:
            if stage not in self.cfg.run.stages:
                continue
            if self.is_done(stage) and stage != "results":
                log(f"{stage}: done, skipped")
                continue
            log(f"{stage}: running")
            t0 = time.time()
            if stage in PARALLEL_STAGES or dist.is_main():
                info = getattr(self, "stage_" + stage.replace("-", "_"))() or {}
                if dist.is_main():
                    self.mark_done(stage, {"seconds": round(time.time() - t0, 2), "world_size": dist.world(), **info})
            if stage not in PARALLEL_STAGES:
                self._reload_after_rank0_stage(stage)
            dist.barrier()
            log(f"{stage}: finished in {time.time() - t0:.1f} s")
        log(f"run finished in {time.time() - t_all:.1f} s: {self.run_dir}")
        return self.run_dir

    def _reload_after_rank0_stage(self, stage: str) -> None:
        """Other ranks pick up what rank 0 computed (the latent statistics)."""
        from . import dist

        dist.barrier()
        if stage == "latents" and not dist.is_main() and self._tokenizer is not None:
            s = load_torch(self.stage_dir("latents") / "stats.pt", self.device)
            self._tokenizer.set_latent_stats(s["mean"], s["std"])

    def stage_tokenizer(self) -> dict[str, Any]:
        d = self.stage_dir("tokenizer")
        d.mkdir(parents=True, exist_ok=True)
        tok = self.tokenizer()
        info: dict[str, Any] = {"params": param_counts(tok)}
        if self.cfg.tokenizer.weights:
            self._load_tokenizer_state(tok, load_torch(self.cfg.tokenizer.weights, self.device))
            info["loaded_from"] = str(self.cfg.tokenizer.weights)
        elif self.cfg.tokenizer.train.images > 0:
            tc = self.cfg.tokenizer.train
            stages = tok.training_stages(tc.images, tc.lr)
            info["stages"] = []
            for i, st in enumerate(stages):
                tag = f"stage{i}-{st.name}" if len(stages) > 1 else "main"
                final = d / f"{tag}.pt"
                tok.begin_stage(st)
                if final.exists():  # finished earlier: carry its weights into the next stage
                    self._load_tokenizer_state(tok, load_torch(final, self.device))
                    info["stages"].append({"stage": st.name, "skipped": True})
                    continue
                torch.manual_seed(self.cfg.run.seed + i)
                result = train_loop(
                    tok, tok.training_phases(st.lr), lambda idx: self._image_batch("train", idx), len(self.dataset("train")),
                    total_images=st.images, batch_size=tc.batch_size, ckpt_path=d / f"ckpt-{tag}.pt", seed=self.cfg.run.seed + i,
                    ema_halflife_images=tc.ema_halflife_images, ckpt_every_images=tc.ckpt_every_images,
                    log_every_images=tc.log_every_images, grad_accum=tc.grad_accum, log_path=d / f"train_log-{tag}.jsonl", desc=f"tokenizer {st.name}",
                )
                if is_main():
                    save_torch(tok.weights_state(), final)
                    plot_curves(d / f"train_log-{tag}.jsonl", d / f"curves-{tag}.png", title=f"{tok.spec.name} training ({st.name})")
                info["stages"].append({"stage": st.name, "images": result.nimg, "steps": result.steps,
                                       "skipped_steps": result.skipped_steps, "resumed_from": result.resumed_from})
        tok.eval()
        if not is_main():
            return info
        save_torch(tok.weights_state(), d / "model.pt")
        with torch.no_grad():
            images, _ = self._image_batch("val", torch.arange(min(8, len(self.dataset("val")))))
            save_pairs(images.cpu(), tok.reconstruct(images, torch.Generator(self.device).manual_seed(0)).cpu(), d / "reconstructions.png")
        return info

    def stage_recon_eval(self) -> dict[str, Any]:
        d = self.stage_dir("recon-eval")
        d.mkdir(parents=True, exist_ok=True)
        tok = self.tokenizer()
        ev = self.evaluator()
        gen = torch.Generator(self.device).manual_seed(self.cfg.run.seed)
        n = self.cfg.metrics.recon_images
        first = None
        with torch.no_grad():
            for images, _, post, _ in self._posteriors("val", n, "reconstruct"):
                recon = tok.decode_uint8(post.sample(gen))
                ev.add_pairs(images, recon)
                if first is None:
                    first = (images[:8].cpu(), recon[:8].cpu())
        save_pairs(*first, d / "reconstructions.png")
        rows = ev.finish("reconstruction", ev.dataset_reference(self.val_reference_key(n), self.val_reference_batches(n)))
        write_rows(d / "rows.jsonl", [self.row(r, images={"reconstructions": "recon-eval/reconstructions.png"}) for r in rows])
        return {"metrics": {r["metric"]: r["value"] for r in rows}, "vfm_feature_cache": dataclasses.asdict(self.feature_stats),
                "reference_cache_hits": ev.reference_cache_hits}

    def val_reference_key(self, n: int) -> dict[str, Any]:
        ds = self.dataset("val")
        return {"dataset": getattr(ds, "cache_id", self.cfg.data.dataset), "split": "val", "resolution": self.cfg.data.resolution, "num_images": min(n, len(ds))}

    def val_reference_batches(self, n: int):
        return lambda: (images for images, _ in self._iter_split("val", n, "reference features"))

    def _vfm_tokens(self, split: str, n: int, flip: bool):
        """Cached VFM tokens of a split (for tokenizers that encode from frozen VFM tokens), or None
        when the tokenizer does not or the cache would be too large (``vfm.cache_features``)."""
        tok = self.tokenizer()
        req = tok.vfm_request()
        mode = self.cfg.vfm.cache_features
        if req is None or mode == "never":
            return None
        vfm, layers = req
        ds = self.dataset(split)
        n = min(n, len(ds)) if n else len(ds)
        res = self.cfg.data.resolution
        grid = round(res * vfm.input_scale / vfm.patch_size)
        nbytes = n * len(layers) * grid * grid * vfm.embed_dim * 4
        if mode == "auto" and nbytes > self.cfg.vfm.cache_max_gib * 2**30:
            return None
        from .feature_cache import cached_tokens

        key = {"dataset": getattr(ds, "cache_id", self.cfg.data.dataset), "split": split, "resolution": res, "images": n, "hflip": flip}
        batches = lambda: (images.flip(-1) if flip else images for images, _ in self._iter_split(split, n, f"VFM tokens {split}"))  # noqa: E731
        return cached_tokens(vfm, layers, key, batches, default_cache_dir(self.cfg) / "vfm-features", stats=self.feature_stats)

    def _posteriors(self, split: str, n: int, desc: str, flip: bool = False):
        """Yield (images, labels, posterior, posterior of the flipped images or None) over a split,
        encoding from cached VFM tokens when the tokenizer allows it."""
        from .interfaces import VfmTokens

        tok = self.tokenizer()
        cached = self._vfm_tokens(split, n, False)
        cached_f = self._vfm_tokens(split, n, True) if flip and cached is not None else None

        def from_cache(tokens, start, stop):
            layers = {k: v[start:stop].to(self.device) for k, v in tokens.items()}
            g = int(round(next(iter(layers.values())).shape[1] ** 0.5))
            return tok.encode_from_vfm(VfmTokens(layers=layers, grid=(g, g)))

        start = 0
        for images, y in self._iter_split(split, n, desc):
            stop = start + images.shape[0]
            if cached is not None:
                post = from_cache(cached, start, stop)
                post_f = from_cache(cached_f, start, stop) if flip else None
            else:
                post = tok.encode(images)
                post_f = tok.encode(images.flip(-1)) if flip else None
            yield images, y, post, post_f
            start = stop

    def _encode_split(self, split: str, flip: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        zs, flips, labels = [], [], []
        gen = torch.Generator(self.device).manual_seed(self.cfg.run.seed + (0 if split == "train" else 1))
        with torch.no_grad():
            for _, y, post, post_f in self._posteriors(split, 0, f"encode {split}", flip=flip):
                zs.append(post.sample(gen).cpu())
                if flip:
                    flips.append(post_f.sample(gen).cpu())
                labels.append(y.cpu())
        z = torch.cat(zs)
        return z, (torch.cat(flips) if flip else z[:0]), torch.cat(labels)

    def stage_latents(self) -> dict[str, Any]:
        d = self.stage_dir("latents")
        d.mkdir(parents=True, exist_ok=True)
        z, zf, y = self._encode_split("train", flip=True)
        save_torch({"latents": z, "flipped": zf, "labels": y}, d / "train.pt")
        zv, _, yv = self._encode_split("val", flip=False)
        save_torch({"latents": zv, "labels": yv}, d / "val.pt")
        both = torch.cat([z, zf]).double()
        mean = both.mean(dim=(0, 2, 3)).float()
        std = both.std(dim=(0, 2, 3)).float()
        save_torch({"mean": mean, "std": std, "num_latents": int(both.shape[0])}, d / "stats.pt")
        self.tokenizer().set_latent_stats(mean.to(self.device), std.to(self.device))
        return {"train_latents": list(z.shape), "val_latents": list(zv.shape), "mean_abs_mean": float(mean.abs().mean()),
                "mean_std": float(std.mean()), "vfm_feature_cache": dataclasses.asdict(self.feature_stats)}

    def _latents(self, split: str) -> dict[str, torch.Tensor]:
        path = self.stage_dir("latents") / f"{split}.pt"
        if not path.exists():
            raise UserError(f"{path} is missing: run the 'latents' stage first (include it in --stages)")
        return load_torch(path)

    def stage_probe(self) -> dict[str, Any]:
        d = self.stage_dir("probe")
        d.mkdir(parents=True, exist_ok=True)
        tr, va = self._latents("train"), self._latents("val")
        rows = self.evaluator().probe(tr["latents"], tr["labels"], va["latents"], va["labels"], self.num_classes)
        write_rows(d / "rows.jsonl", [self.row(r) for r in rows])
        return {"metrics": {r["metric"]: r["value"] for r in rows}}

    def diffusion_model(self):
        tok = self.tokenizer()
        model = build_diffusion(self.host, self.cfg, tok.latent_shape(self.cfg.data.resolution), self.num_classes)
        return model.to(self.device)

    def stage_diffusion(self) -> dict[str, Any]:
        d = self.stage_dir("diffusion")
        d.mkdir(parents=True, exist_ok=True)
        tok = self.tokenizer()
        data = self._latents("train")
        z = tok.normalize(data["latents"].to(self.device))
        zf = tok.normalize(data["flipped"].to(self.device)) if data["flipped"].numel() else z
        labels = data["labels"].to(self.device)
        torch.manual_seed(self.cfg.run.seed + 1)
        model = self.diffusion_model()
        tc = self.cfg.diffusion.train
        # Diffusion-side VFM alignment (REPA/REG): per-item targets for the image or its flip.
        request = model.alignment_request() if hasattr(model, "alignment_request") else None
        align = None
        if request is not None:
            from . import dist
            from .alignment import alignment_targets

            ds = self.dataset("train")
            if not is_main():
                dist.barrier()  # rank 0 fills the feature cache first
            align = alignment_targets(
                self.host, self.cfg, request, device=self.device, cache_dir=default_cache_dir(self.cfg), stats=self.feature_stats,
                key_fields={"dataset": getattr(ds, "cache_id", self.cfg.data.dataset), "split": "train", "resolution": self.cfg.data.resolution, "images": len(ds)},
                batches=lambda flip: (x.flip(-1) if flip else x for x, _ in self._iter_split("train", 0, "alignment features")),
                images=lambda idx: self._image_batch("train", idx)[0],
            )
            if is_main():
                dist.barrier()

        def get_batch(idx: torch.Tensor):
            idx = idx.to(self.device)
            use_flip = torch.rand(idx.shape[0], device=self.device) < 0.5  # global RNG: restored on resume
            x = torch.where(use_flip.view(-1, 1, 1, 1), zf[idx], z[idx])
            if align is None:
                return x, labels[idx]
            return x, labels[idx], align(idx, use_flip, self.device)

        # Convergence evaluation: train in segments, sample and evaluate the EMA weights after each (on rank 0).
        from . import dist
        from .convergence import ConvergenceCurve

        settings = model.convergence_eval() if hasattr(model, "convergence_eval") else None
        curve = ConvergenceCurve(self, model, settings, d) if settings else None
        first = None
        points = curve.points(tc.images) if curve else [tc.images]
        for i, total in enumerate(points):
            if curve is not None and i < len(points) - 1 and curve.is_done(total, tc.batch_size):
                continue  # evaluated before an interruption: training continues in the next segment
            result = train_loop(
                model, model.training_phases(tc.lr), get_batch, z.shape[0], total_images=total, batch_size=tc.batch_size,
                ckpt_path=d / "ckpt.pt", seed=self.cfg.run.seed + 1, ema_halflife_images=tc.ema_halflife_images,
                ckpt_every_images=tc.ckpt_every_images, log_every_images=tc.log_every_images or max(tc.batch_size, tc.images // 100),
                grad_accum=tc.grad_accum, log_path=d / "train_log.jsonl", desc="diffusion",
            )
            first = first or result
            if curve is not None:
                if is_main():
                    curve.evaluate(result.nimg)
                dist.barrier()
        if is_main():
            save_torch(model.state_dict(), d / "model.pt")
            plot_curves(d / "train_log.jsonl", d / "curves.png", title=f"{model.spec.name} training")
        info = {"params": param_counts(model), "images": result.nimg, "steps": result.steps, "resumed_from": first.resumed_from, "skipped_steps": result.skipped_steps}
        if align is not None:
            info["vfm_feature_cache"] = dataclasses.asdict(self.feature_stats)
        if curve is not None:
            info["convergence_gfid"] = curve.summary()
        return info

    def stage_sample(self) -> dict[str, Any]:
        from .metrics.adm import write_samples_npz
        from .sampling import sample, sample_labels

        d = self.stage_dir("sample")
        d.mkdir(parents=True, exist_ok=True)
        tok = self.tokenizer()
        model = self.diffusion_model()
        model.load_state_dict(load_torch(self.stage_dir("diffusion") / "model.pt", self.device))
        model.eval()
        sc = self.cfg.diffusion.sample
        gen = torch.Generator(self.device).manual_seed(self.cfg.run.seed + 2)
        labels = sample_labels(sc.num_images, self.num_classes, mode=sc.label_sampling, generator=gen).to(self.device)
        shape = tok.latent_shape(self.cfg.data.resolution)
        out = []
        with torch.no_grad():
            for start in tqdm(range(0, sc.num_images, sc.batch_size), desc="sample", unit="batch", leave=False, dynamic_ncols=True):
                y = labels[start : start + sc.batch_size]
                noise = torch.randn((y.shape[0], *shape), generator=gen, device=self.device)
                z = sample(
                    model, noise, y, sampler=sc.sampler, steps=sc.steps, cfg_scale=sc.cfg_scale, cfg_interval=tuple(sc.cfg_interval),
                    timestep_shift=sc.timestep_shift, generator=gen, precision=sc.precision,
                )
                out.append(tok.decode_uint8(tok.denormalize(z)).cpu())
        images = torch.cat(out)
        write_samples_npz(d / "samples.npz", images)
        torch.save(labels.cpu(), d / "labels.pt")
        order = torch.argsort(labels.cpu(), stable=True)[:64]
        save_grid(images[order], d / "samples.png")
        return {"num_images": int(images.shape[0])}

    def stage_gen_eval(self) -> dict[str, Any]:
        from .metrics.adm import read_samples_npz
        from .results import read_rows

        d = self.stage_dir("gen-eval")
        d.mkdir(parents=True, exist_ok=True)
        images = read_samples_npz(self.stage_dir("sample") / "samples.npz")
        ev = self.evaluator()
        bs = self.cfg.metrics.batch_size
        for start in tqdm(range(0, images.shape[0], bs), desc="sample features", unit="batch", leave=False, dynamic_ncols=True):
            ev.add_samples(images[start : start + bs].to(self.device))
        n = len(self.dataset("val"))
        sc = self.cfg.diffusion.sample
        extra = {
            "sampler": sc.sampler, "steps": sc.steps, "guidance": "cfg" if sc.cfg_scale != 1.0 else "none",
            "cfg_scale": sc.cfg_scale, "cfg_interval": list(sc.cfg_interval), "timestep_shift": sc.timestep_shift,
            "label_sampling": sc.label_sampling, "sample_precision": sc.precision,
            "diffusion_images": self.cfg.diffusion.train.images,
            "diffusion_epochs": round(self.cfg.diffusion.train.images / len(self.dataset("train")), 4),
        }
        if self.cfg.metrics.reference:
            reference = ev.adm_reference(self.cfg.metrics.reference)
        else:
            reference = ev.dataset_reference(self.val_reference_key(n), self.val_reference_batches(n))
        rows = ev.finish("generation", reference, extra_protocol=extra)
        rows = [self.row(r, images={"samples": "sample/samples.png"}) for r in rows]
        curve = self.stage_dir("diffusion") / "convergence.jsonl"  # gFID-versus-images rows of the diffusion stage
        write_rows(d / "rows.jsonl", rows + (read_rows(curve) if curve.exists() else []))
        return {"metrics": {r["metric"]: r["value"] for r in rows}}

    def stage_results(self) -> dict[str, Any]:
        from .results import read_rows

        rows = []
        for stage in ("recon-eval", "probe", "gen-eval"):
            p = self.stage_dir(stage) / "rows.jsonl"
            if p.exists():
                rows.extend(read_rows(p))
        write_rows(self.run_dir / "results.jsonl", rows)
        self.host.pm.hook.results_written(run_dir=self.run_dir, rows=rows)
        return {"rows": len(rows)}

    # -- rows -----------------------------------------------------------------------------------
    def row(self, r: dict[str, Any], images: dict[str, str] | None = None) -> dict[str, Any]:
        """A full result row from an evaluator row (metric, value, family, protocol, ...)."""
        h, c = self.host, self.cfg
        tok = h.tokenizers.get(c.tokenizer.name)
        vfm = h.vfms.get(c.vfm.name) if tok.uses_vfm else None
        dec = decoder_name(h, c)
        diff = h.diffusion.get(c.diffusion.name)
        ds = h.datasets.get(c.data.dataset)
        family = r["family"]
        smoke = c.run.smoke or r.get("smoke", False)
        row = {
            "schema": SCHEMA_VERSION,
            "run_id": self.run_dir.name,
            "label": "smoke" if smoke else "official",
            "tokenizer": tok.name,
            "tokenizer_version": tok.version,
            "vfm": vfm.name if vfm else "",
            "vfm_version": vfm.version if vfm else "",
            "vfm_weights": self.ctx().vfm().weights_id if vfm else "",
            "decoder": dec,
            "decoder_version": h.decoders.get(dec).version if dec else "",
            "diffusion": diff.name if family == "generation" else "",
            "diffusion_version": diff.version if family == "generation" else "",
            "dataset": ds.name,
            "dataset_version": ds.version,
            "split": r.get("split", "val"),
            "resolution": c.data.resolution,
            "metric": r["metric"],
            "metric_version": r["metric_version"],
            "family": family,
            "value": r["value"],
            "higher_is_better": r["higher_is_better"],
            "protocol": r["protocol"],
            "seed": c.run.seed,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
            "vfmbench_version": __version__,
            "git": git_hash(),
            "images": images or {},
        }
        return row
