"""The request bodies, with OpenAI's field names (and the seed's routes' own)."""
from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import APIError

__all__ = ["CompletionRequest", "ChatRequest", "EmbeddingRequest", "InferenceRequest", "EmbedRequest",
           "EmbedBatchRequest", "SamplingBody", "UNSUPPORTED"]


#: OpenAI parameters this server does not implement, each with why: asked for, they get a 400
#: that names them (never a 200 that ignored them). Unknown fields get one too, as OpenAI does.
UNSUPPORTED = {
    "tools": "tool calls: no model here has a tool-calling template",
    "tool_choice": "tool calls: no model here has a tool-calling template",
    "functions": "function calls: no model here has a tool-calling template",
    "function_call": "function calls: no model here has a tool-calling template",
    "parallel_tool_calls": "tool calls: no model here has a tool-calling template",
    "echo": "echo of the prompt",
    "suffix": "fill-in-the-middle suffixes",
    "best_of": "best_of (use n and pick)",
    "audio": "audio output", "modalities": "other modalities than text", "prediction": "predicted outputs",
    "reasoning_effort": "reasoning models", "web_search_options": "web search",
    "dimensions": "other embedding sizes than the model's",
}


class _Body(BaseModel):
    """OpenAI's bodies: an unknown field is a 400 naming it, as OpenAI answers."""
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        if isinstance(data, dict):
            for key in data:
                if key in UNSUPPORTED and key not in cls.model_fields:
                    raise APIError(400, f"parameter {key!r} is not supported by this server ({UNSUPPORTED[key]})",
                                   param=key, code="unsupported_parameter")
        return data


class SamplingBody(_Body):
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: dict | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # OpenAI's end-user id: accepted, used for nothing
    # accepted where they change nothing here
    store: bool | None = None
    metadata: dict | None = None
    service_tier: str | None = None


class CompletionRequest(SamplingBody):
    model: str
    prompt: Union[str, list[str]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)


class ChatRequest(SamplingBody):
    model: str
    messages: list[dict]
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict | None = None


class EmbeddingRequest(_Body):
    model: str
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


class _SeedBody(BaseModel):
    model_config = ConfigDict(extra="ignore")  # the seed's clients send what they like


class InferenceRequest(_SeedBody):
    prompt: str
    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.7, ge=0, le=2)
    model: str | None = None


class EmbedRequest(_SeedBody):
    text: str
    model: str | None = None


class EmbedBatchRequest(_SeedBody):
    texts: list[str]
    model: str | None = None
