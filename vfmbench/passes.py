"""Data passes shared by the built-in stages (a mixin of ``vfmbench.context.RunContext``).

Batches of a split in index order (optionally this rank's block under torchrun), training batches
by index, posteriors (from cached VFM tokens when the tokenizer allows it), per-image posterior
samples whose noise does not depend on batch or world size, and the val split as a reference.
"""
from __future__ import annotations

from typing import Any

import torch
from tqdm import tqdm

from . import dist


class DataPasses:
    """Needs ``cfg``, ``device``, ``run_dir``, ``dataset(split)``, ``tokenizer()``, ``feature_stats``."""

    def image_batch(self, split: str, idx: torch.Tensor, view: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels of some indices, in order and always all of them: a corrupt image
        stops the run naming the file, or under ``data.skip_corrupt`` is replaced by the next index
        that decodes (training batches keep their size; exact resume stays exact). ``view``: a
        transformed view of the split (``transforms.training_view``), loaded by its own loader."""
        from .data import BatchLoader, worker_count

        loaders = self.__dict__.setdefault("_batch_loaders", {})
        key = split if view is None or view is self.dataset(split) else f"{split}:{view.cache_id}"
        if key not in loaders:
            d = self.cfg.data
            loaders[key] = BatchLoader(
                self.dataset(split) if key == split else view, split=split, num_workers=worker_count(d.num_workers),
                on_corrupt="replace" if d.skip_corrupt else "raise", skips=self.data_skips(), pin_memory=self.device.type == "cuda",
            )
        images, labels = loaders[key].load([int(i) for i in idx])
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def iter_split(self, split: str, n: int, desc: str, shard: bool = False):
        """Batches of ``metrics.batch_size`` over the first ``n`` images of a split (0 = all), in
        index order. ``shard=True`` under torchrun: this rank's contiguous block of batches only
        (``dist.shard_batches``; the ranks' blocks in rank order cover every index once).

        Under ``data.skip_corrupt`` a corrupt image is dropped from val passes (evaluation: no image
        counted twice) and replaced by the next decodable index in train passes, so that position k
        of a train pass is still dataset index k (the latents and the alignment targets of the
        diffusion stage are indexed by dataset index)."""
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
        skips = self.__dict__.get("_data_skips")
        if skips is None:
            from .context import log
            from .data import SkipCounter, skip_file, skip_files

            skips = self.__dict__["_data_skips"] = SkipCounter(path=skip_file(self.run_dir, dist.rank()), others=lambda: skip_files(self.run_dir), log=log)
        return skips

    def skipped_images(self) -> dict[str, int]:
        """Corrupt images skipped so far, per split (every rank and invocation of this run)."""
        return self.data_skips().counts()

    # -- the val split as a reference -----------------------------------------------------------
    def val_reference_key(self, n: int) -> dict[str, Any]:
        ds = self.dataset("val")
        return {"dataset": getattr(ds, "cache_id", self.cfg.data.dataset), "split": "val", "resolution": self.cfg.data.resolution, "num_images": min(n, len(ds))}

    def val_reference_batches(self, n: int):
        return lambda: (images for images, _ in self.iter_split("val", n, "reference features"))

    def val_reference_shard(self, n: int):
        """Batches of the first ``n`` val images for reference features: this rank's block under torchrun."""
        return lambda: (images for images, _ in self.iter_split("val", n, "reference features", shard=True))

    # -- posteriors -------------------------------------------------------------------------------
    def vfm_tokens(self, split: str, n: int, flip: bool):
        """Cached VFM tokens of a split (for tokenizers that encode from frozen VFM tokens), or None
        when the tokenizer does not or the cache would be too large (``vfm.cache_features``).
        Under torchrun rank 0 fills the cache on a miss while the others wait, then they read it."""
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
        batches = lambda: (images.flip(-1) if flip else images for images, _ in self.iter_split(split, n, f"VFM tokens {split}"))  # noqa: E731
        if not dist.is_main():
            dist.barrier()
        tokens = cached_tokens(vfm, layers, key, batches, self.cache_dir / "vfm-features", stats=self.feature_stats)
        if dist.is_main():
            dist.barrier()
        return tokens

    def posteriors(self, split: str, n: int, desc: str, flip: bool = False):
        """Yield (index of the first image, images, labels, posterior, posterior of the flipped
        images or None) over the first ``n`` images of a split (0 = all), in batches of
        ``metrics.batch_size``; under torchrun only this rank's block of batches. Encodes from cached
        VFM tokens when the tokenizer allows it."""
        from .interfaces import VfmTokens

        tok = self.tokenizer()
        cached = self.vfm_tokens(split, n, False)
        cached_f = self.vfm_tokens(split, n, True) if flip and cached is not None else None

        def from_cache(tokens, start, stop):
            layers = {k: v[start:stop].to(self.device) for k, v in tokens.items()}
            g = int(round(next(iter(layers.values())).shape[1] ** 0.5))
            return tok.encode_from_vfm(VfmTokens(layers=layers, grid=(g, g)))

        total = min(n, len(self.dataset(split))) if n else len(self.dataset(split))
        starts = [start for _, start, _ in dist.shard_batches(total, self.cfg.metrics.batch_size)]
        for start, (images, y) in zip(starts, self.iter_split(split, n, desc, shard=True)):
            stop = start + images.shape[0]
            if cached is not None:
                post = from_cache(cached, start, stop)
                post_f = from_cache(cached_f, start, stop) if flip else None
            else:
                post = tok.encode(images)
                post_f = tok.encode(images.flip(-1)) if flip else None
            yield start, images, y, post, post_f

    def posterior_sample(self, post, stream: tuple, start: int) -> torch.Tensor:
        """``mean + std * eps`` with each image's ``eps`` drawn from its own generator, seeded by
        (run seed, ``stream``, image index): the same latents whatever the batch size or world size."""
        shape = tuple(post.mean.shape[1:])
        eps = torch.stack([
            torch.randn(shape, generator=torch.Generator().manual_seed(dist.derive_seed(self.cfg.run.seed, *stream, start + i)))
            for i in range(post.mean.shape[0])
        ])
        return post.mean + post.std * eps.to(device=post.mean.device, dtype=post.mean.dtype)

    def encode_split(self, split: str, flip: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Posterior samples (and those of the flipped images) and labels of a whole split, in index
        order; under torchrun each rank encodes its block and rank 0 gets the whole split, the
        other ranks None."""
        zs, flips, labels = [], [], []
        with torch.no_grad():
            for start, _, y, post, post_f in self.posteriors(split, 0, f"encode {split}", flip=flip):
                zs.append(self.posterior_sample(post, ("latents", split), start).cpu())
                if flip:
                    flips.append(self.posterior_sample(post_f, ("latents-flip", split), start).cpu())
                labels.append(y.cpu())
        local = (torch.cat(zs), torch.cat(flips) if flip else None, torch.cat(labels)) if zs else None
        parts = [p for p in dist.gather_object(local) or [] if p is not None]
        if not dist.is_main():
            return None
        z = torch.cat([p[0] for p in parts])
        return z, (torch.cat([p[1] for p in parts]) if flip else z[:0]), torch.cat([p[2] for p in parts])
