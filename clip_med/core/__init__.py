"""Layer 0, usable by every other layer: device and precision, torch.distributed, durable writes, worker pools."""
