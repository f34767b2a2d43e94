"""Diffusion-DPO: Direct Preference Optimization for text-to-image diffusion models.

Wallace et al., 2023, "Diffusion Model Alignment Using Direct Preference Optimization".
"""

__version__ = "0.1.0"
