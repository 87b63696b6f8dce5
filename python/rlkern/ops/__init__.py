"""Public ops: each module registers its ``torch.ops.rlkern`` ops on import."""
