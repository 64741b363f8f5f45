"""lorafed on Flower's deployment engine (Message API): a ServerApp, a ClientApp, and local deployment.

Payloads travel as lorafed safetensors bytes inside an ``ArrayRecord`` (one ``uint8`` array of
stype ``safetensors``); the config travels as YAML text. The server validates every reply with
:func:`lorafed.server.validate.validate_update` and aggregates with :class:`lorafed.server.step.RoundPolicy`,
the same code as the simulator. Importing this package does not import flwr; its modules do.
"""
