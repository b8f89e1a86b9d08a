"""Errors of the request path that the HTTP layer turns into answers (see app/api/errors.py). No torch."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A request that passed the schema but breaks a rule or a configured limit; `field` names the culprit."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class DuplicateLora(InvalidRequest):
    """One LoRA listed twice in a request (by name, or two entries that resolve to the same file)."""

    def __init__(self, brand_id: str, version: str | None = None, field: str = "lora_configs"):
        what = f"LoRA {brand_id!r}" + (f" version {version!r}" if version else "")
        super().__init__(field, f"{what} is listed twice; give each LoRA once")
        self.brand_id, self.version = brand_id, version


class LoraUnavailable(Exception):
    """A requested LoRA could not be applied and the request asked for strict handling."""

    def __init__(self, brand_id: str, reason: str):
        super().__init__(f"LoRA {brand_id!r} cannot be applied: {reason}")
        self.brand_id = brand_id
        self.reason = reason


class LoraNotFound(LookupError):
    """An operator asked about a LoRA (brand or version) that does not exist; the message names what does."""


class QueueFull(Exception):
    def __init__(self, waiting: int, retry_after_s: int):
        super().__init__(f"{waiting} requests are already waiting; try again in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class QueueTimeout(Exception):
    pass


class ClientGone(Exception):
    pass


class JobCanceled(Exception):
    """The image was canceled (`StepControl.cancel`) before or while it was generated; it has no result."""

    def __init__(self, message: str = "the generation was canceled"):
        super().__init__(message)


class ServiceUnavailable(Exception):
    """The service takes no new work now (draining for shutdown, model not loaded, worker stalled)."""


class GenerationOutOfMemory(RuntimeError):
    """The device ran out of memory during one generation; the engine has released what it could."""


class AnsweredError(Exception):
    """An error that already carries its HTTP answer: raised where the request path ran in another
    process (a Ray replica) and sent back the answer its own error became (app/api/errors.py)."""

    def __init__(self, status: int, message: str, field: str | None = None, kind: str = "value_error",
                 headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.field, self.kind, self.headers = status, field, kind, headers


def check_unique(specs, field: str = "lora_configs", fields=None) -> None:
    """Each (brand, version) once in a request's LoRA list: the one duplicate rule of every entry point.

    `fields`, when given, names the request field of each spec (e.g. the `brand_id` appended last).
    """
    seen: set[tuple[str, str | None]] = set()
    for i, spec in enumerate(specs):
        if spec.ref in seen:
            raise DuplicateLora(spec.brand_id, field=fields[i] if fields else field)
        seen.add(spec.ref)
