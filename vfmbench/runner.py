"""The runner: one combination of tokenizer, VFM, decoder and diffusion model, stage by stage.

Stages: tokenizer (train or load) -> recon-eval -> latents (cache + statistics) -> probe ->
diffusion (train on cached latents) -> sample -> gen-eval -> results. Each stage writes into its
own folder of the run directory and marks itself done; re-running the same command skips finished
stages and continues an interrupted one from its last checkpoint.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
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
from . import latent_eval
from .plugins import Host
from .results import SCHEMA_VERSION, write_rows
from .train import train_loop

# Stages that run on every rank under torchrun (the others run on rank 0): training is data-parallel,
# encoding, sampling and feature extraction are sharded by blocks of batches and gathered on rank 0.
PARALLEL_STAGES = ("tokenizer", "recon-eval", "latents", "latent-eval", "diffusion", "sample", "gen-eval")

# Config keys that do not change what a run computes (excluded from the run directory's hash).
NON_RESULT_KEYS = {
    ("run", "stages"), ("run", "out"), ("run", "num_threads"), ("run", "cache_dir"), ("metrics", "batch_size"),
    ("tokenizer", "train", "keep_checkpoints"), ("diffusion", "train", "keep_checkpoints"),
    # speed and memory switches: the same run directory, so e.g. checkpointing can rescue a run that ran out of memory
    ("run", "compile"), ("run", "compile_backend"), ("run", "grad_checkpointing"), ("run", "channels_last"),
    ("data", "num_workers"), ("data", "shuffle_buffer"), ("metrics", "cache_image_features"),
}


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
    for *path, key in NON_RESULT_KEYS:
        node = d
        for part in path:
            node = node[part]
        node.pop(key, None)
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
    from .metrics.preflight import check_metrics

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
    check_metrics(cfg)  # the ADM reference batch and the IS protocol, before any work (also --dry-run)
    for m in cfg.metrics.names:
        host.metrics.get(m)
    latent_eval.validate(cfg)
    from .diffusion_weights import check_config

    check_config(cfg.diffusion)
    s = cfg.diffusion.sample
    if s.label_sampling not in ("random", "balanced"):
        raise UserError(f"diffusion.sample.label_sampling must be 'random' or 'balanced', got {s.label_sampling!r}")
    if len(s.cfg_interval) != 2 or not 0.0 <= s.cfg_interval[0] <= s.cfg_interval[1] <= 1.0:
        raise UserError(f"diffusion.sample.cfg_interval must be [t_low, t_high] within [0, 1], got {s.cfg_interval}")
    for section, tc in (("tokenizer", cfg.tokenizer.train), ("diffusion", cfg.diffusion.train)):
        if tc.keep_checkpoints < 1:
            raise UserError(f"{section}.train.keep_checkpoints must be at least 1 (the newest checkpoint), got {tc.keep_checkpoints}")
        if tc.precision not in ("", "fp32", "bf16"):
            raise UserError(f"{section}.train.precision must be fp32, bf16 or '' (run.precision), got {tc.precision!r}")
    if cfg.vfm.cache_features not in ("auto", "always", "never"):
        raise UserError(f"vfm.cache_features must be auto, always or never, got {cfg.vfm.cache_features!r}")
    if cfg.run.precision not in ("fp32", "bf16"):
        raise UserError(f"run.precision must be 'fp32' or 'bf16', got {cfg.run.precision!r}")
    if cfg.data.resolution % tok_downsample(host, cfg) != 0:
        raise UserError(
            f"data.resolution={cfg.data.resolution} is not a multiple of the tokenizer's downsampling "
            f"factor {tok_downsample(host, cfg)}"
        )


LATENT_FILES = ("train.pt", "val.pt", "stats.pt")


def _link_files(src: Path, dst: Path, names: tuple[str, ...]) -> None:
    """Hard-link (else copy) ``names`` from ``src`` into ``dst``, each atomically (temporary name, rename)."""
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        tmp = dst / f".{name}.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(src / name, tmp)
        except OSError:  # another filesystem, or links not allowed
            shutil.copyfile(src / name, tmp)
        os.replace(tmp, dst / name)


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
        if stages & {"tokenizer", "diffusion", "latents", "latent-eval", "probe"}:
            self.dataset("train")
        if self.cfg.tokenizer.weights and not Path(self.cfg.tokenizer.weights).exists():
            raise UserError(f"tokenizer.weights={self.cfg.tokenizer.weights!r} does not exist; pass a model.pt written by a previous run")
        spec = self.host.tokenizers.get(self.cfg.tokenizer.name)
        if spec.uses_vfm:
            self.ctx().vfm()  # resolves (and loads) the VFM weights, or fails with where it looked
        if stages & {"recon-eval", "gen-eval", "latent-eval"}:
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
            if self.cfg.data.num_workers < 0:
                raise UserError(f"data.num_workers must be >= 0 (0 decodes in the main process), got {self.cfg.data.num_workers}")
            if self.cfg.data.shuffle_buffer < 0:
                raise UserError(f"data.shuffle_buffer must be >= 0 (0 keeps shard order), got {self.cfg.data.shuffle_buffer}")
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
        """``done.json`` of a stage: ``info`` plus the date and this process's peak memory (``vfmbench.perf.peak_memory``)."""
        from .perf import peak_memory

        write_json(self.stage_dir(stage) / "done.json", {"stage": stage, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                                         **peak_memory(self.device), **info})

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
        bad_missing = [k for k in missing if not k.startswith(tok.frozen_prefixes) and not k.endswith("_extra_state")]
        if unexpected or bad_missing:
            raise UserError(
                f"tokenizer weights do not match {tok.spec.name!r}: missing {bad_missing[:5]}, unexpected {unexpected[:5]}; "
                "check tokenizer.args against the run that wrote them"
            )

    def _image_batch(self, split: str, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels of some indices, in order and always all of them: a corrupt image
        stops the run naming the file, or under ``data.skip_corrupt`` is replaced by the next index
        that decodes (training batches keep their size; exact resume stays exact)."""
        from .data import BatchLoader, worker_count

        loaders = getattr(self, "_batch_loaders", None)
        if loaders is None:
            loaders = self._batch_loaders = {}
        if split not in loaders:
            d = self.cfg.data
            loaders[split] = BatchLoader(
                self.dataset(split), split=split, num_workers=worker_count(d.num_workers),
                on_corrupt="replace" if d.skip_corrupt else "raise", skips=self.data_skips(), pin_memory=self.device.type == "cuda",
            )
        images, labels = loaders[split].load([int(i) for i in idx])
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def _iter_split(self, split: str, n: int, desc: str, shard: bool = False):
        """Batches of ``metrics.batch_size`` over the first ``n`` images of a split (0 = all), in
        index order. ``shard=True`` under torchrun: this rank's contiguous block of batches only
        (``dist.shard_batches``; the ranks' blocks in rank order cover every index once).

        Under ``data.skip_corrupt`` a corrupt image is dropped from val passes (evaluation: no image
        counted twice) and replaced by the next decodable index in train passes, so that position k
        of a train pass is still dataset index k (the latents and the alignment targets of the
        diffusion stage are indexed by dataset index)."""
        from . import dist
        from .data import iter_batches, worker_count

        ds = self.dataset(split)
        n = min(n, len(ds)) if n else len(ds)
        bs = self.cfg.metrics.batch_size
        if shard and dist.is_distributed():
            indices: Any = [i for _, start, stop in dist.shard_batches(n, bs) for i in range(start, stop)]
        else:
            indices = range(n)
        d = self.cfg.data
        on_corrupt = ("replace" if split == "train" else "drop") if d.skip_corrupt else "raise"
        batches = iter_batches(
            ds, indices, bs, split=split, num_workers=worker_count(d.num_workers), on_corrupt=on_corrupt,
            skips=self.data_skips(), pin_memory=self.device.type == "cuda",
        )
        for images, labels in tqdm(batches, total=-(-len(indices) // bs), desc=desc, unit="batch", leave=False, dynamic_ncols=True):
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def data_skips(self):
        """The ``vfmbench.data.SkipCounter`` of this run: corrupt images skipped under
        ``data.skip_corrupt``, recorded in ``skipped-images*.json`` of the run directory (one file per
        rank), so that later invocations and rank 0 count what every process skipped."""
        skips = getattr(self, "_data_skips", None)
        if skips is None:
            from . import dist
            from .data import SkipCounter, skip_file, skip_files

            skips = self._data_skips = SkipCounter(path=skip_file(self.run_dir, dist.rank()), others=lambda: skip_files(self.run_dir), log=log)
        return skips

    def skipped_images(self) -> dict[str, int]:
        """Corrupt images skipped so far, per split (every rank and invocation of this run)."""
        return self.data_skips().counts()

    # -- stages ---------------------------------------------------------------------------------
    def execute(self) -> Path:
        """Run the configured stages. Under torchrun the ranks first check that they share one
        config; the stages of ``PARALLEL_STAGES`` run on every rank (training data-parallel, the
        others sharded and gathered on rank 0); the rest run on rank 0 while the others wait; only
        rank 0 writes files. Every rank reads the run directory (checkpoints, models, samples), so
        on several nodes it must be on a shared filesystem."""
        from . import dist
        from .perf import begin_stage

        dist.check_same_config(config_hash(self.cfg.to_dict(), 64))
        batches = self._global_batches()
        if dist.is_main():
            self.write_config()
        dist.barrier()
        t_all = time.time()
        for stage in STAGES:
            if stage not in self.cfg.run.stages:
                continue
            if dist.broadcast_object(self.is_done(stage)) and stage != "results":  # rank 0 decides for all ranks
                log(f"{stage}: done, skipped")
                continue
            log(f"{stage}: running" + (f" ({batches[stage]})" if stage in batches else ""))
            begin_stage(self.cfg.run, self.device)  # process-wide numerics (run.tf32) and a fresh peak-memory window
            t0 = time.time()
            if stage in PARALLEL_STAGES or dist.is_main():
                info = getattr(self, "stage_" + stage.replace("-", "_"))() or {}
                if dist.is_main():
                    if self.cfg.data.skip_corrupt:
                        info["data_skipped_images"] = self.skipped_images()  # per split, e.g. {"train": 1}
                    self.mark_done(stage, {"seconds": round(time.time() - t0, 2), "world_size": dist.world(), **info})
            dist.barrier()  # stages outside PARALLEL_STAGES: the other ranks wait for rank 0 here
            log(f"{stage}: finished in {time.time() - t0:.1f} s")
        log(f"run finished in {time.time() - t_all:.1f} s: {self.run_dir}")
        return self.run_dir

    def _global_batches(self) -> dict[str, str]:
        """Check, before any work, that each training stage's global batch splits over the ranks
        (UserError otherwise); the split of each, for the log."""
        from . import dist

        out = {}
        for stage, tc in (("tokenizer", self.cfg.tokenizer.train), ("diffusion", self.cfg.diffusion.train)):
            if stage not in self.cfg.run.stages or tc.images <= 0 or (self.cfg.tokenizer.weights if stage == "tokenizer" else self.cfg.diffusion.weights):
                continue
            per = dist.per_device_batch(tc.batch_size, tc.grad_accum, f"{stage}.train")
            out[stage] = f"global batch {tc.batch_size} = {per} per device x {dist.world()} ranks x {tc.grad_accum} accumulation steps"
        return out

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
                    ema_halflife_images=tc.ema_halflife_images, ckpt_every_images=tc.ckpt_every_images, keep_checkpoints=tc.keep_checkpoints,
                    log_every_images=tc.log_every_images, grad_accum=tc.grad_accum, log_path=d / f"train_log-{tag}.jsonl", desc=f"tokenizer {st.name}",
                    precision=tc.precision or self.cfg.run.precision, compile=self.cfg.run.compile, compile_backend=self.cfg.run.compile_backend,
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
        """Every rank reconstructs and featurises its block of the val images (posterior noise per
        image index, so the result does not depend on the world size); rank 0 gets the metrics."""
        from . import dist

        d = self.stage_dir("recon-eval")
        d.mkdir(parents=True, exist_ok=True)
        tok = self.tokenizer()
        ev = self.evaluator()
        ev.sharded = True
        ev.image_feature_cache = {"hits": 0, "misses": 0}  # this stage's
        n = self.cfg.metrics.recon_images
        first = None
        with torch.no_grad():
            for start, images, _, post, _ in self._posteriors("val", n, "reconstruct"):
                recon = tok.decode_uint8(self._posterior_sample(post, ("recon-eval", "val"), start))
                ev.add_pairs(images, recon)
                if start == 0:
                    first = (images[:8].cpu(), recon[:8].cpu())
        # the first n images of the val split's cached features (the gFID reference reads the same cache)
        n_val = len(self.dataset("val"))
        reference = ev.dataset_reference(self.val_reference_key(n_val), self._val_reference_shard(n_val), take=n)
        rows = ev.finish("reconstruction", reference)
        first = next((f for f in dist.gather_object(first) or [] if f is not None), None)
        if not dist.is_main():
            return {}
        save_pairs(*first, d / "reconstructions.png")
        write_rows(d / "rows.jsonl", [self.row(r, images={"reconstructions": "recon-eval/reconstructions.png"}) for r in rows])
        return {"metrics": {r["metric"]: r["value"] for r in rows}, "vfm_feature_cache": dataclasses.asdict(self.feature_stats),
                "reference_cache_hits": ev.reference_cache_hits, "image_feature_cache": dict(ev.image_feature_cache)}

    def _val_reference_shard(self, n: int):
        """Batches of the first ``n`` val images for reference features: this rank's block under torchrun."""
        return lambda: (images for images, _ in self._iter_split("val", n, "reference features", shard=True))

    def val_reference_key(self, n: int) -> dict[str, Any]:
        ds = self.dataset("val")
        return {"dataset": getattr(ds, "cache_id", self.cfg.data.dataset), "split": "val", "resolution": self.cfg.data.resolution, "num_images": min(n, len(ds))}

    def val_reference_batches(self, n: int):
        return lambda: (images for images, _ in self._iter_split("val", n, "reference features"))

    def _vfm_tokens(self, split: str, n: int, flip: bool):
        """Cached VFM tokens of a split (for tokenizers that encode from frozen VFM tokens), or None
        when the tokenizer does not or the cache would be too large (``vfm.cache_features``).
        Under torchrun rank 0 fills the cache on a miss while the others wait, then they read it."""
        from . import dist

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
        if not dist.is_main():
            dist.barrier()
        tokens = cached_tokens(vfm, layers, key, batches, default_cache_dir(self.cfg) / "vfm-features", stats=self.feature_stats)
        if dist.is_main():
            dist.barrier()
        return tokens

    def _posteriors(self, split: str, n: int, desc: str, flip: bool = False):
        """Yield (index of the first image, images, labels, posterior, posterior of the flipped
        images or None) over the first ``n`` images of a split (0 = all), in batches of
        ``metrics.batch_size``; under torchrun only this rank's block of batches. Encodes from cached
        VFM tokens when the tokenizer allows it."""
        from . import dist
        from .interfaces import VfmTokens

        tok = self.tokenizer()
        cached = self._vfm_tokens(split, n, False)
        cached_f = self._vfm_tokens(split, n, True) if flip and cached is not None else None

        def from_cache(tokens, start, stop):
            layers = {k: v[start:stop].to(self.device) for k, v in tokens.items()}
            g = int(round(next(iter(layers.values())).shape[1] ** 0.5))
            return tok.encode_from_vfm(VfmTokens(layers=layers, grid=(g, g)))

        total = min(n, len(self.dataset(split))) if n else len(self.dataset(split))
        starts = [start for _, start, _ in dist.shard_batches(total, self.cfg.metrics.batch_size)]
        for start, (images, y) in zip(starts, self._iter_split(split, n, desc, shard=True)):
            stop = start + images.shape[0]
            if cached is not None:
                post = from_cache(cached, start, stop)
                post_f = from_cache(cached_f, start, stop) if flip else None
            else:
                post = tok.encode(images)
                post_f = tok.encode(images.flip(-1)) if flip else None
            yield start, images, y, post, post_f

    def _posterior_sample(self, post, stream: tuple, start: int) -> torch.Tensor:
        """``mean + std * eps`` with each image's ``eps`` drawn from its own generator, seeded by
        (run seed, ``stream``, image index): the same latents whatever the batch size or world size."""
        from . import dist

        shape = tuple(post.mean.shape[1:])
        eps = torch.stack([
            torch.randn(shape, generator=torch.Generator().manual_seed(dist.derive_seed(self.cfg.run.seed, *stream, start + i)))
            for i in range(post.mean.shape[0])
        ])
        return post.mean + post.std * eps.to(device=post.mean.device, dtype=post.mean.dtype)

    def _encode_split(self, split: str, flip: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Posterior samples (and those of the flipped images) and labels of a whole split, in index
        order; under torchrun each rank encodes its block and rank 0 gets the whole split, the
        other ranks None."""
        from . import dist

        zs, flips, labels = [], [], []
        with torch.no_grad():
            for start, _, y, post, post_f in self._posteriors(split, 0, f"encode {split}", flip=flip):
                zs.append(self._posterior_sample(post, ("latents", split), start).cpu())
                if flip:
                    flips.append(self._posterior_sample(post_f, ("latents-flip", split), start).cpu())
                labels.append(y.cpu())
        local = (torch.cat(zs), torch.cat(flips) if flip else None, torch.cat(labels)) if zs else None
        parts = [p for p in dist.gather_object(local) or [] if p is not None]
        if not dist.is_main():
            return None
        z = torch.cat([p[0] for p in parts])
        return z, (torch.cat([p[1] for p in parts]) if flip else z[:0]), torch.cat([p[2] for p in parts])

    def stage_latents(self) -> dict[str, Any]:
        """Every rank encodes its block of each split; rank 0 writes the gathered latents (identical
        to a one-process run) and their statistics, which every rank then uses."""
        from . import dist

        d = self.stage_dir("latents")
        d.mkdir(parents=True, exist_ok=True)
        cache = default_cache_dir(self.cfg) / "latents" / self._latent_cache_key()
        hit = dist.broadcast_object((cache / "done.json").exists() if dist.is_main() else None)
        stats = None
        if hit:  # the same tokenizer weights on the same images: the latents of an earlier run
            if dist.is_main():
                _link_files(cache, d, LATENT_FILES)
                s = load_torch(d / "stats.pt")
                stats = (s["mean"], s["std"])
        else:
            train = self._encode_split("train", flip=True)
            val = self._encode_split("val", flip=False)
            if dist.is_main():
                (z, zf, y), (zv, _, yv) = train, val
                save_torch({"latents": z, "flipped": zf, "labels": y}, d / "train.pt")
                save_torch({"latents": zv, "labels": yv}, d / "val.pt")
                both = torch.cat([z, zf]).double()
                mean = both.mean(dim=(0, 2, 3)).float()
                std = both.std(dim=(0, 2, 3)).float()
                save_torch({"mean": mean, "std": std, "num_latents": int(both.shape[0])}, d / "stats.pt")
                stats = (mean, std)
                _link_files(d, cache, LATENT_FILES)
                write_json(cache / "done.json", {"run": self.run_dir.name})
        mean, std = dist.broadcast_object(stats)
        self.tokenizer().set_latent_stats(mean.to(self.device), std.to(self.device))
        if not dist.is_main():
            return {}
        z, zv = load_torch(d / "train.pt")["latents"], load_torch(d / "val.pt")["latents"]
        return {"train_latents": list(z.shape), "val_latents": list(zv.shape), "mean_abs_mean": float(mean.abs().mean()),
                "mean_std": float(std.mean()), "latent_cache": "hit" if hit else "miss", "latent_cache_dir": str(cache),
                "vfm_feature_cache": dataclasses.asdict(self.feature_stats)}

    def _latent_cache_key(self) -> str:
        """What the latents depend on: the tokenizer's weights (hashed), its identity and the frozen
        VFM's weights, the images (dataset id, split sizes, resolution, corrupt-image policy), the
        posterior-sampling seed and the precision of encoding."""
        import hashlib

        tok = self.tokenizer()
        h = hashlib.sha256()
        for name, t in sorted(tok.weights_state().items()):
            if isinstance(t, torch.Tensor):
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        spec = self.host.tokenizers.get(self.cfg.tokenizer.name)
        ds_tr, ds_va = self.dataset("train"), self.dataset("val")
        key = {
            "weights_sha256": h.hexdigest(), "tokenizer": [spec.name, spec.version],
            "vfm": self.ctx().vfm().weights_id if spec.uses_vfm else "",
            "dataset": getattr(ds_tr, "cache_id", self.cfg.data.dataset), "val_dataset": getattr(ds_va, "cache_id", self.cfg.data.dataset),
            "train_images": len(ds_tr), "val_images": len(ds_va), "resolution": self.cfg.data.resolution,
            "skip_corrupt": self.cfg.data.skip_corrupt, "seed": self.cfg.run.seed, "precision": self.cfg.run.precision, "version": 1,
        }
        return config_hash(key, 16)

    def _latents(self, split: str) -> dict[str, torch.Tensor]:
        path = self.stage_dir("latents") / f"{split}.pt"
        if not path.exists():
            raise UserError(f"{path} is missing: run the 'latents' stage first (include it in --stages)")
        return load_torch(path)

    def stage_latent_eval(self) -> dict[str, Any]:
        return latent_eval.run_stage(self)

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
        if self.cfg.diffusion.weights:  # released or earlier weights: nothing to train, the sample stage loads them
            return {"skipped": "diffusion.weights is set", "weights": self.cfg.diffusion.weights}
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
            use_flip = torch.rand(idx.shape[0], device=self.device) < (0.5 if getattr(model, "train_hflip", True) else 0.0)  # global RNG: restored on resume
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
                ckpt_every_images=tc.ckpt_every_images, keep_checkpoints=tc.keep_checkpoints, log_every_images=tc.log_every_images or max(tc.batch_size, tc.images // 100),
                grad_accum=tc.grad_accum, log_path=d / "train_log.jsonl", desc="diffusion",
                precision=tc.precision or self.cfg.run.precision, compile=self.cfg.run.compile, compile_backend=self.cfg.run.compile_backend,
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
        """Samples in batches of ``diffusion.sample.batch_size``: batch k's noise (initial and SDE)
        comes from a generator seeded by (seed, k), so the images do not depend on the world size;
        under torchrun each rank samples its block of batches and rank 0 writes them all."""
        from . import dist
        from .metrics.adm import write_samples_npz
        from .sampling import sample, sample_labels, sample_options

        d = self.stage_dir("sample")
        d.mkdir(parents=True, exist_ok=True)
        tok = self.tokenizer()
        from .diffusion_weights import sample_to_latents, sampling_model

        model, loaded = sampling_model(self.host, self.cfg, tok.latent_shape(self.cfg.data.resolution), self.num_classes,
                                       self.device, trained=self.stage_dir("diffusion") / "model.pt")
        sc = self.cfg.diffusion.sample
        gen = torch.Generator(self.device).manual_seed(self.cfg.run.seed + 2)
        labels = sample_labels(sc.num_images, self.num_classes, mode=sc.label_sampling, generator=gen).to(self.device)
        shape = tok.latent_shape(self.cfg.data.resolution)
        out = []
        mine = dist.shard_batches(sc.num_images, sc.batch_size)
        with torch.no_grad():
            for k, start, stop in tqdm(mine, desc="sample", unit="batch", leave=False, dynamic_ncols=True, disable=not dist.is_main() or None):
                y = labels[start:stop]
                g = torch.Generator(self.device).manual_seed(dist.derive_seed(self.cfg.run.seed, "sample", k))
                noise = torch.randn((y.shape[0], *shape), generator=g, device=self.device)
                z = sample(model, noise, y, **sample_options(sc), generator=g, precision=self.cfg.sample_precision)
                out.append(tok.decode_uint8(sample_to_latents(tok, z, self.cfg.diffusion)).cpu())
        parts = dist.gather_object(torch.cat(out) if out else None)
        if not dist.is_main():
            return {}
        images = torch.cat([x for x in parts if x is not None])
        write_samples_npz(d / "samples.npz", images)
        torch.save(labels.cpu(), d / "labels.pt")
        order = torch.argsort(labels.cpu(), stable=True)[:64]
        save_grid(images[order], d / "samples.png")
        return {"num_images": int(images.shape[0]), "weights": loaded}

    def stage_gen_eval(self) -> dict[str, Any]:
        """Every rank featurises its block of the samples (and of the reference on a cache miss);
        rank 0 gets the metrics and writes the rows."""
        from . import dist
        from .metrics.adm import read_samples_npz
        from .results import read_rows

        d = self.stage_dir("gen-eval")
        d.mkdir(parents=True, exist_ok=True)
        images = read_samples_npz(self.stage_dir("sample") / "samples.npz")
        ev = self.evaluator()
        ev.sharded = True
        ev.image_feature_cache = {"hits": 0, "misses": 0}  # this stage's
        bs = self.cfg.metrics.batch_size
        mine = dist.shard_batches(images.shape[0], bs)
        for _, start, stop in tqdm(mine, desc="sample features", unit="batch", leave=False, dynamic_ncols=True, disable=not dist.is_main() or None):
            ev.add_samples(images[start:stop].to(self.device))
        n = len(self.dataset("val"))
        sc = self.cfg.diffusion.sample
        from .sampling import sampler_protocol

        extra = {
            **sampler_protocol(sc), "diffusion_weights": Path(self.cfg.diffusion.weights).name if self.cfg.diffusion.weights else "trained",
            "label_sampling": sc.label_sampling, "sample_precision": self.cfg.sample_precision,
            "diffusion_train_precision": self.cfg.diffusion.train.precision or self.cfg.run.precision,
            "diffusion_images": self.cfg.diffusion.train.images,
            "diffusion_epochs": round(self.cfg.diffusion.train.images / len(self.dataset("train")), 4),
        }
        if self.cfg.metrics.reference:
            reference = ev.adm_reference(self.cfg.metrics.reference)
        else:
            reference = ev.dataset_reference(self.val_reference_key(n), self._val_reference_shard(n))
        rows = ev.finish("generation", reference, extra_protocol=extra)
        if not dist.is_main():
            return {}
        rows = [self.row(r, images={"samples": "sample/samples.png"}) for r in rows]
        curve = self.stage_dir("diffusion") / "convergence.jsonl"  # gFID-versus-images rows of the diffusion stage
        write_rows(d / "rows.jsonl", rows + (read_rows(curve) if curve.exists() else []))
        return {"metrics": {r["metric"]: r["value"] for r in rows}, "reference_cache_hits": ev.reference_cache_hits,
                "image_feature_cache": dict(ev.image_feature_cache)}

    def stage_results(self) -> dict[str, Any]:
        from .results import read_rows

        rows = []
        for stage in ("recon-eval", "latent-eval", "probe", "gen-eval"):
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
            "protocol": {**r["protocol"], "data_skipped_images": self.data_skips().total()} if c.data.skip_corrupt else r["protocol"],
            "seed": c.run.seed,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
            "vfmbench_version": __version__,
            "git": git_hash(),
            "images": images or {},
        }
        return row
