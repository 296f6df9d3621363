#!/usr/bin/env python3
"""Validates every success body of a results file against the openai SDK's own types.

    validate.py OUTPUT.jsonl

A body is parsed by the type its `object` names (chat.completion: ChatCompletion, response:
Response, text_completion: Completion, list: CreateEmbeddingResponse). A base64 embedding is
first decoded to floats as the SDK's own embeddings parser does (little-endian f32), since the
type declares the decoded list. The SDK's models accept
fields they do not know, so the check also refuses any such extra field, at any depth: a
misspelt field is an error, not silently ignored. One extension is allowed, and only there: a
reasoning model's thinking in a chat message's `reasoning_content` (the field llama-server,
vLLM and DeepSeek use). Prints one line per body checked and exits 1 on the first that fails.
"""
import re
import array
import base64
import json
import sys

from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from openai.types.responses import Response
from pydantic import BaseModel

TYPES = {
    "chat.completion": ChatCompletion,
    "response": Response,
    "text_completion": Completion,
    "list": CreateEmbeddingResponse,
}


# The one documented extension: the thinking of a chat choice.
EXTENSION = re.compile(r"body\.choices\[\d+\]\.message\.reasoning_content")


def extras(model, path="body"):
    """Paths of fields the SDK's types do not declare."""
    found = [f"{path}.{k}" for k in (model.model_extra or {})]
    for name in type(model).model_fields:
        value = getattr(model, name, None)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, BaseModel):
                sub = f"{path}.{name}[{i}]" if isinstance(value, list) else f"{path}.{name}"
                found += extras(item, sub)
    return found


def decode_embeddings(body):
    """Base64 vectors as the SDK's embeddings parser decodes them."""
    for item in body.get("data") or []:
        vector = item.get("embedding")
        if isinstance(vector, str):
            raw = base64.b64decode(vector, validate=True)
            if len(raw) % 4:
                raise ValueError(f"base64 vector of {len(raw)} bytes is not f32s")
            item["embedding"] = array.array("f", raw).tolist()


def main():
    checked = 0
    for n, line in enumerate(open(sys.argv[1]), 1):
        response = json.loads(line).get("response")
        if not response:
            continue
        body = response["body"]
        kind = TYPES.get(body.get("object"))
        if kind is None:
            sys.exit(f"line {n}: unknown body object {body.get('object')!r}")
        if kind is CreateEmbeddingResponse:
            decode_embeddings(body)
        parsed = kind.model_validate(body)
        unknown = [f for f in extras(parsed) if not EXTENSION.fullmatch(f)]
        if unknown:
            sys.exit(f"line {n}: fields the {kind.__name__} type does not declare: {unknown}")
        print(f"line {n}: {kind.__name__} ok")
        checked += 1
    if checked == 0:
        sys.exit("no success bodies to check")


if __name__ == "__main__":
    main()
