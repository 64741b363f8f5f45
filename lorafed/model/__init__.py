"""The client model: a frozen (int8) backbone with LoRA and a trainable head."""
