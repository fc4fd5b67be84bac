"""CPU test bed for encode/language disaggregation: tiny checkpoints, images and an HF reference."""
