"""PeCo / VQ-VAE tokenizer training at scale."""
