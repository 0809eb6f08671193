"""``nn.Module`` drop-ins, checkpoint-compatible with the originals."""
