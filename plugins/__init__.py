"""vfmbench first-party plugins, installed as the package ``vfmbench_plugins``; each module is one plugin."""
