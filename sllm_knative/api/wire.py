"""What the internal APIs share: the message base type, strict scalars, and one way of turning a
malformed body into an error that names the field.

Every request and response body between the processes is a `Message` (pydantic v2). A body is
validated where it arrives: `parse_json` (raw bytes) or `parse_obj` (already decoded JSON) return
the message or raise `InvalidBody`, whose `field` is the path of the first offending field in the
body (`instances[0].url`, `state.tokens[3]`; None when the body itself is not an object) and whose
message starts with it. Each server turns `InvalidBody` into its own 400 shape.

Integers are strict (`Int`, `NonNegInt`): a JSON string, a float or a boolean is not an integer,
as the hand-written checks these types replaced held. Unknown fields are ignored (a newer sender
may add some); messages that carry a document onward unchanged (an exported generation state)
allow them explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError

Int = Annotated[int, Strict()]
NonNegInt = Annotated[int, Strict(), Field(ge=0)]
NonEmptyStr = Annotated[str, Field(min_length=1)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class Message(BaseModel):
    """A request or response body of an internal API."""

    model_config = ConfigDict(extra="ignore")


M = TypeVar("M", bound=BaseModel)


class InvalidBody(ValueError):
    """A body that does not match its message type; `field` names where (None: the whole body)."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def field_path(loc: Sequence[int | str], root: str = "") -> str | None:
    """`("instances", 0, "url")` -> `instances[0].url` (prefixed with `root.` when given)."""
    out = root
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or None


def invalid_body(exc: ValidationError, root: str = "") -> InvalidBody:
    """The first error of a validation failure, as an `InvalidBody` naming its field."""
    err = exc.errors(include_url=False)[0]
    field = field_path(err["loc"], root)
    msg = str(err["msg"])
    if err["type"] == "model_type" and not err["loc"]:
        msg = "the body must be a JSON object"
    elif err["type"] == "json_invalid":
        msg = f"the body is not JSON: {err.get('ctx', {}).get('error', msg)}"
    return InvalidBody(field, f"{field}: {msg}" if field else msg)


def parse_json(model: type[M], raw: bytes | str) -> M:
    """`model` from a JSON body, or InvalidBody naming the first bad field."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise invalid_body(exc) from None


def parse_obj(model: type[M], obj: Any, root: str = "") -> M:
    """`model` from decoded JSON (`root` prefixes the field names: where the object sits)."""
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise invalid_body(exc, root) from None
