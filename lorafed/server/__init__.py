"""The server: validate updates against a trusted spec, then aggregate them into the next global adapter."""
