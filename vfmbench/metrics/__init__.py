"""Metric stages: features -> statistics -> value. Pure functions, no models or globals in value stages."""
