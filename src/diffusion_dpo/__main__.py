"""`python -m diffusion_dpo` is the same program as `diffusion-dpo` (so `accelerate launch -m` works)."""

from diffusion_dpo.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
