"""Building blocks shared by the model families: norms, RoPE, attention backends, MLPs, losses, MoE."""
