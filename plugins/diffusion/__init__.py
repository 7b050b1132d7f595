"""vfmbench first-party plugins."""
