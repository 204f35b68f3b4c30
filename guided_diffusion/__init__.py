"""Our guided-diffusion (ADM) UNet and Gaussian diffusion; loads the official checkpoints."""
