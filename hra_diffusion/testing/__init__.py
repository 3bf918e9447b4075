"""Test models, kept out of the library's namespace: tiny Stable Diffusion pipelines with random weights, built offline
from configs (`tiny`), for the tests, the benchmarks, the docs' quick starts and the app when the demo world is
absent. They draw noise. ``python -m hra_diffusion.testing.tiny OUT`` writes one."""
