"""Models of the PeCo tokenizer: VQ-VAE, quantizer, discriminator and the frozen perceptual network."""
