"""Example third-party vfmbench plugins, one module and one entry point each:

- ``abs_error``: a pair feature extractor (per-image mean absolute pixel error);
- ``mae_metric``: a reconstruction metric on that extractor's feature;
- ``mobilenet``: torchvision's MobileNetV2 (ImageNet weights, offline) as a frozen VFM, a CNN without an adapter;
- ``active_units``: a run stage (active latent channels of the posterior mean) whose rows reach the leaderboard.
"""
