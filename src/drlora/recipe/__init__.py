"""`drlora train`: the recipe that fine-tunes an MoE with DR-LoRA on transformers' Trainer and writes a run folder."""
