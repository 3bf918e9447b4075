"""Test models, kept out of the library's namespace: tiny SD, SDXL, SD3 and FLUX.1 pipelines with random weights,
built offline from configs (`tiny`) with their tokenizers (`offline_tokenizers`), for the tests, the benchmarks, the
docs' quick starts and the app when the demo world is absent. They draw noise.
``python -m hra_diffusion.testing.tiny OUT --family sd|sdxl|sd3|flux`` writes one."""
