"""The client: local training and the one client step every engine runs."""
