"""The wire format: which adapter tensors travel, how they are encoded, and the payload file."""
