"""The gateway's OpenAPI 3.0 document (GET /openapi.json): its endpoints, request bodies and errors.

Written by hand (the gateway is a plain ASGI app, not a framework that derives one): the subset of
vLLM's OpenAI-compatible API the gateway serves, plus its SLO fields and headers. Clients need none of
it; it is what API fuzzers (schemathesis) generate requests from.
"""

from __future__ import annotations

from typing import Any

from qlmctl import __version__


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def openapi_document(models: list[str], slo_classes: list[str]) -> dict[str, Any]:
    """The OpenAPI document of a gateway serving `models` with these SLO classes."""
    slo_headers = [
        {"name": "x-slo-class", "in": "header", "required": False, "description": "SLO class of the request.",
         "schema": {"type": "string", "enum": slo_classes}},
        {"name": "x-slo-ttft-s", "in": "header", "required": False,
         "description": "The request's own TTFT deadline, seconds (replaces its class's).",
         "schema": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"}},
        {"name": "x-request-id", "in": "header", "required": False, "description": "The client's id for the request.",
         "schema": {"type": "string", "maxLength": 64}},
    ]
    common_fields: dict[str, Any] = {
        "model": {"type": "string", "enum": models},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": 64},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {
            "include_usage": {"type": "boolean"}, "continuous_usage_stats": {"type": "boolean"}}},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "ignore_eos": {"type": "boolean"},
        "slo_class": {"type": "string", "enum": slo_classes},
        "slo_ttft_s": {"type": "number", "exclusiveMinimum": True, "minimum": 0},
        "n": {"type": "integer", "enum": [1]},
    }
    completions = {"type": "object", "required": ["prompt"], "properties": {
        **common_fields,
        "prompt": {"oneOf": [{"type": "string", "minLength": 1, "maxLength": 400},
                             {"type": "array", "items": {"type": "string", "maxLength": 400}, "minItems": 1,
                              "maxItems": 1}]},
    }}
    chat = {"type": "object", "required": ["messages"], "properties": {
        **common_fields,
        "max_completion_tokens": {"type": "integer", "minimum": 1, "maximum": 64},
        "messages": {"type": "array", "minItems": 1, "maxItems": 4, "items": {
            "type": "object", "required": ["role", "content"], "properties": {
                "role": {"type": "string", "enum": ["system", "user", "assistant"]},
                "content": {"type": "string", "maxLength": 400}}}},
    }}
    answers = {
        "200": {"description": "The answer: one JSON body, or server-sent events when `stream` is true.",
                "content": {"application/json": {"schema": {"type": "object"}},
                            "text/event-stream": {"schema": {"type": "string"}}}},
        "400": _error_response("Bad request: malformed JSON, a bad field, a prompt over the context length."),
        "401": _error_response("Missing or wrong API key."),
        "404": _error_response("Unknown model."),
        "413": _error_response("Body too large."),
        "429": _error_response("The SLO class's queue is full; see Retry-After."),
        "502": _error_response("The engines failed the request more often than its retry budget allows."),
        "503": _error_response("Shutting down, or no healthy engine for the model; see Retry-After."),
        "504": _error_response("The engines stalled on the request more often than its retry budget allows."),
    }

    def completion_op(summary: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"summary": summary, "parameters": slo_headers,
                "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
                "responses": answers}

    return {
        "openapi": "3.0.3",
        "info": {"title": "qlmctl gateway (QLM in front of vLLM)", "version": __version__},
        "paths": {
            "/v1/completions": {"post": completion_op("OpenAI completions, queued by SLO.", completions)},
            "/v1/chat/completions": {"post": completion_op("OpenAI chat completions, queued by SLO.", chat)},
            "/v1/models": {"get": {"summary": "Served models.", "responses": {
                "200": {"description": "Model list.", "content": {"application/json": {"schema": {"type": "object"}}}},
                "401": _error_response("Missing or wrong API key.")}}},
            "/health": {"get": {"summary": "200 while some engine is healthy and the gateway takes requests.",
                                "responses": {"200": {"description": "Healthy."},
                                              "503": _error_response("No healthy engine, or shutting down.")}}},
            "/metrics": {"get": {"summary": "Prometheus metrics.", "responses": {
                "200": {"description": "Prometheus text.", "content": {"text/plain": {"schema": {"type": "string"}}}},
                "401": _error_response("Missing or wrong API key.")}}},
        },
        "components": {"schemas": {"Error": {
            "type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["message", "type", "code"],
                "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                               "param": {"type": "string", "nullable": True}, "code": {"type": "integer"}}}}}}},
    }
