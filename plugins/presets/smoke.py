"""Plugin: the ``smoke`` preset, the embedded default: CPU, offline, tiny models, a few minutes on 2 cores.

Every component is the real code path at test size: a random-init VFM of the real library class
(``vfm.size=tiny``), the built-in procedural ``shapes`` dataset at 64 px, and a deterministic
He-initialised Inception file instead of the official one. Every number it produces is labelled
``smoke`` and is never shown beside paper-protocol numbers.
"""
from vfmbench.hookspecs import hookimpl
from vfmbench.specs import PresetSpec

SMOKE = {
    "run": {"smoke": True, "device": "auto", "seed": 0},
    "data": {"dataset": "shapes", "resolution": 64, "train_images": 2048, "val_images": 256, "batch_size": 32},
    "vfm": {"name": "siglip", "size": "tiny", "pretrained": False},
    "tokenizer": {
        "name": "vfm-vae",
        "train": {"images": 3072, "batch_size": 32, "lr": 2e-3, "ema_halflife_images": 500, "ckpt_every_images": 1024},
    },
    "diffusion": {
        "name": "flow-dit",
        "train": {"images": 8192, "batch_size": 64, "lr": 1e-3, "ema_halflife_images": 1000, "ckpt_every_images": 2048},
        "sample": {"num_images": 128, "sampler": "euler", "steps": 16, "cfg_scale": 1.0, "batch_size": 64},
    },
    "metrics": {"recon_images": 128, "batch_size": 64, "isc_splits": 4, "probe": {"epochs": 100}},
    "component_args": {
        "vfm-vae": {"latent_channels": 8, "head_width": 32},
        "kl-vae": {"latent_channels": 4, "downsample": 8, "base_channels": 32, "channel_mult": [1, 2, 2], "blocks": 1},
        "conv-decoder": {"base_channels": 32, "channel_mult": [1, 2, 2, 2], "blocks": 1},
        "flow-dit": {"width": 128, "depth": 4, "heads": 4, "patch_size": 1},
    },
}


@hookimpl
def register_presets(register):
    register(
        PresetSpec(
            name="smoke",
            description="Embedded default: CPU, offline, tiny random-init models on the procedural shapes dataset (numbers labelled smoke)",
            values=SMOKE,
            version="1",
            source="vfmbench",
            license="Apache-2.0",
        )
    )
