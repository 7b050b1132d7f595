"""Built-in run stages, one module each, registered through ``register_stages`` like any plugin:

tokenizer (train or load) -> recon-eval -> latents (cache + statistics) -> probe -> diffusion
(train on cached latents) -> sample -> gen-eval -> results. The planner (``vfmbench.planner``)
orders them by the artifacts they need and produce; each receives a ``vfmbench.context.RunContext``.
"""
