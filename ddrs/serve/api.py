"""The service's contract: the request and response models of every endpoint, the error
statuses each may answer, and the Bearer scheme (what `/openapi.json` documents)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

IMAGE_TYPES = ("image/png", "image/jpeg")  # what the contract names; PIL reads more


class RequestError(Exception):
    """A request the service refuses: HTTP `status` and one line for the client."""

    def __init__(self, status: int, message: str, **headers: str):
        super().__init__(message)
        self.status, self.headers = status, headers


class ErrorBody(BaseModel):
    """Every refusal and failure: one line saying what is wrong and what to do."""

    error: str = Field(description="what is wrong, in one line")


class AnswerBody(BaseModel):
    """The answer to a query, stored in the memory before it was sent."""

    predict: int = Field(description="the class, or -1: abstain")
    class_name: str | None = Field(description="the class's name, when the dataset has names")
    radius: float = Field(
        description="certified L2 radius, in the inputs' [0, 1] pixel units: "
        "the prediction cannot change within this distance (with probability "
        ">= 1 - alpha over the sampling); 0 for predict"
    )
    sigma: float = Field(description="the noise level of the certificate")
    changed: bool = Field(
        description="the memory gave another class than the Monte Carlo one "
        "(the input lies in an earlier answer's ball)"
    )
    shrunk: bool = Field(
        description="the memory shrank the radius (a ball of another class is near)"
    )
    mc_predict: int = Field(
        description="the Monte Carlo class before the memory (for a repeat: the stored one)"
    )
    mc_radius: float = Field(
        description="the Monte Carlo radius before the memory (for a repeat: the stored one)"
    )
    repeat: bool = Field(
        description="an exact repeat of a stored input: its stored answer, given without sampling"
    )
    entry: int = Field(
        description="the memory entry holding this answer (-1: a service without a memory)"
    )
    expert: str = Field(description="the expert that answered (a service of experts), or ''")


class HealthBody(BaseModel):
    """Liveness; the service's settings only to those who may query it."""

    model_config = ConfigDict(extra="allow")
    status: str = Field(description="ok")
    entries: int | None = Field(None, description="answers stored in the memory")
    in_flight: int | None = Field(None, description="queries received and not yet answered")


class MemoryStatsBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    entries: int
    classes: dict[int, int]
    abstentions: int
    changed: int
    shrunk: int
    repeats: int


MEANING = {
    400: "bad request (not JSON, not an image, a malformed form, a Host not allowed, nested "
    "too deeply)",
    401: "missing or wrong token (Authorization: Bearer <token>)",
    403: "a cross-origin write without the token",
    404: "no such path (or, for memory statistics, a service without a memory)",
    405: "method not allowed on this path (the Allow header lists those that are)",
    408: "the request body did not arrive in time (--body-timeout)",
    413: "body or image too large",
    415: "unsupported Content-Type (send application/json, image/png, image/jpeg, or multipart)",
    422: "the input is not a valid query (shape, values, numbers, fields)",
    500: "the engine failed on this query",
    503: "the memory's database is unavailable (retry after Retry-After seconds)",
}


def errors(*statuses: int) -> dict:
    """The `responses` of an endpoint: each status with the error body and what it means."""
    return {status: {"model": ErrorBody, "description": MEANING[status]} for status in statuses}


QUERY_ERRORS = (400, 401, 403, 408, 413, 415, 422, 500, 503)


def input_schema(shape) -> dict:
    """The JSON body of a query for inputs of `shape`: exact sizes at every level, numbers in
    [0, 1] (so that a contract fuzzer sends valid queries too)."""
    item: dict = {"type": "number", "minimum": 0, "maximum": 1}
    for size in reversed(tuple(shape)):
        item = {"type": "array", "items": item, "minItems": int(size), "maxItems": int(size)}
    return {
        "title": "InputBody",
        "type": "object",
        "required": ["input"],
        "additionalProperties": False,
        "properties": {
            "input": {**item, "description": "the input, numbers in [0, 1] (un-normalised pixels)"}
        },
    }


_IMAGE = {"type": "string", "format": "binary"}
QUERY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InputBody"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "additionalProperties": False,
                    "properties": {"file": {**_IMAGE, "description": "the image"}},
                },
                "encoding": {"file": {"contentType": ", ".join(IMAGE_TYPES)}},
            },
            **{media: {"schema": _IMAGE} for media in IMAGE_TYPES},
        },
    },
}
PREVIEW_RESPONSE = {
    200: {
        "content": {"image/png": {"schema": _IMAGE}},
        "description": "the input as the model sees it, enlarged",
    }
}
