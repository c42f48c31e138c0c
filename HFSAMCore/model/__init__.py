"""HF-SAM model: backbone (SAM encoder + checkpoints), LoRA, AWFFM, decoder, assembly."""
