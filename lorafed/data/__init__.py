"""Data: read a table, clean it, split each client's rows and tokenize them once."""
