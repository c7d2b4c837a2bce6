"""secant-jax: few-step diffusion models by the secant losses (Liu & Yue, NeurIPS 2025)."""
