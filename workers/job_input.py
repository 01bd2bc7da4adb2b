"""Job arguments as the contract reads them: a job that breaks it is refused, never retried."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from producer.contract import describe

M = TypeVar("M", bound=BaseModel)


class InvalidJob(ValueError):
    """A job whose arguments break the contract; it is failed at once, never retried."""


def validated(model: type[M], payload: Any) -> M:
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise InvalidJob(describe(exc)) from None
