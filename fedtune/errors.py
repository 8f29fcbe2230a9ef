"""Exceptions that mean "the user asked for something wrong or impossible".

The CLI turns every `FedtuneError` into one line on stderr and exit code 2, with no
traceback. Anything else is a bug and keeps its traceback.
"""


class FedtuneError(Exception):
    """A user-facing error: the message alone must tell the user what to fix."""


class ConfigError(FedtuneError):
    """A configuration key or value is unknown, malformed or out of range."""


class DataError(FedtuneError):
    """A data file or named dataset cannot be used as given."""


class ModelError(FedtuneError):
    """A base model or adapter cannot be loaded as given."""


class BudgetExhaustedError(FedtuneError):
    """The next training call would take the privacy ledger past its target epsilon."""


class AdapterNotUpdatedError(FedtuneError):
    """Training ran but the adapter did not change (opacus#820 / peft#3409 symptom)."""


class DeadlinePassedError(FedtuneError):
    """A node stopped training at the round's deadline; what it charged stays charged."""
