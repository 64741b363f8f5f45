"""Named errors raised by lorafed.

Every error a user can cause derives from :class:`LorafedError`; the CLI turns it
into a one-paragraph message and exit code 2, so a traceback means a bug in lorafed.
"""

from __future__ import annotations


class LorafedError(Exception):
    """Base class of all errors caused by input (configs, data, payloads)."""


class ConfigError(LorafedError):
    """A config file or override is invalid. The message lists every problem found."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = list(problems)
        self.source = source
        bullet = "\n  - ".join(self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s):\n  - {bullet}")


class DataError(LorafedError):
    """A data file cannot be read or does not hold what the config says.

    Attributes:
        path: The file concerned.
        row: 1-based data row number (header excluded) when one row is at fault.
        field: The column concerned, if any.
    """

    def __init__(self, message: str, path: str | None = None, row: int | None = None, field: str | None = None) -> None:
        self.path, self.row, self.field = path, row, field
        where = ", ".join(
            part
            for part in (
                f"{path}" if path else "",
                f"row {row}" if row is not None else "",
                f"column {field!r}" if field else "",
            )
            if part
        )
        super().__init__(f"{where}: {message}" if where else message)


class ModelError(LorafedError):
    """The backbone cannot be found or loaded as a sequence classifier."""


class PayloadError(LorafedError):
    """A payload file is unreadable or its header is invalid (not a lorafed safetensors file)."""

    def __init__(self, message: str, path: str | None = None) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class PayloadValidationError(LorafedError):
    """A well-formed payload does not fit the federation it was sent to.

    Attributes:
        client: The client id from the payload header.
        field: The header field or tensor name at fault.
        expected: What the server expected.
        received: What the payload holds.
    """

    def __init__(self, client: str, field: str, expected: object, received: object, source: str = "") -> None:
        self.client, self.field, self.expected, self.received, self.source = (
            client,
            field,
            expected,
            received,
            source,
        )
        origin = f" ({source})" if source else ""
        super().__init__(
            f"update from client {client!r}{origin} rejected: {field}: expected {expected}, received {received}"
        )


class StorageError(LorafedError):
    """A file-drop name or file is refused: a symbolic link, a name leaving the drop, or two
    names that the file system maps to one file.

    Attributes:
        name: The name in the drop.
    """

    def __init__(self, message: str, name: str) -> None:
        self.name = name
        super().__init__(f"{name}: {message}")


class AggregationError(LorafedError):
    """Aggregation cannot proceed (no updates, weights that do not sum to a positive number)."""


class PrivacyBudgetError(LorafedError):
    """A client's next round would spend more record-level privacy than its budget allows.

    Attributes:
        client: The client id.
        round: The round that was refused.
        epsilon: The epsilon the client would have spent after that round.
        budget: The configured budget (``train.record_dp.max_epsilon``).
        delta: The delta of the guarantee.
    """

    def __init__(self, client: str, round_: int, epsilon: float, budget: float, delta: float) -> None:
        self.client, self.round, self.epsilon, self.budget, self.delta = client, round_, epsilon, budget, delta
        super().__init__(
            f"client {client!r} refuses round {round_}: its privacy budget would be exceeded (epsilon "
            f"{epsilon:.3f} > max_epsilon {budget:.3f} at delta {delta:.3g}); raise train.record_dp.max_epsilon "
            "or stop training this client"
        )


class SignatureError(LorafedError):
    """A signature, key or key registry is missing, malformed, or does not verify.

    Attributes:
        source: The payload, key or registry concerned (a path, ``node-7``, a drop name).
    """

    def __init__(self, message: str, source: str = "") -> None:
        self.source = source
        super().__init__(f"{source}: {message}" if source else message)
