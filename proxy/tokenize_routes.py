"""POST /tokenize and /detokenize (also under /v1), in vLLM's shapes and in llama.cpp's.

vLLM:      {model?, messages, add_generation_prompt?, tools?, chat_template_kwargs?}
           or {model?, prompt, add_special_tokens?, return_token_strs?} -> {count, max_model_len, tokens}
llama.cpp: {content, add_special?, with_pieces?} -> {tokens} (ids, or {id, piece} objects)

The shape is told by the fields: `content` (and neither `messages` nor `prompt`) is
llama.cpp's. A chat is parsed and rendered exactly as a chat completion is (the same
parsing, template call and escaping of control tokens in the messages), so `count` is
that request's `usage.prompt_tokens`; a prompt is encoded as /v1/completions encodes a
string prompt. `/detokenize {model?, tokens}` answers `{prompt, content}`: vLLM's key
and llama.cpp's, one text. The model is found as for a generation (aliases and
--default-model included); a model served nowhere here goes to --upstream, else 404.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy import openai_api as api
from proxy.errors import InvalidRequest
from proxy.guards import check_text_size
from proxy.routes import context_limit, model_request
from proxy.served_model import ServedModel
from proxy.state import CONFIG


async def tokenize(request: web.Request) -> web.StreamResponse:
    body, served = await model_request(request)
    if not isinstance(served, ServedModel):
        return served
    if "messages" in body:
        tokens = await _chat_tokens(request, served, body)
    elif "prompt" in body:
        tokens = await _text_tokens(served, body, "prompt", _flag(body, "add_special_tokens", True))
    elif "content" in body:
        return web.json_response({"tokens": await _llama_cpp_tokens(served, body)})
    else:
        raise InvalidRequest("give messages or prompt (vLLM), or content (llama.cpp)", param="messages")
    out: dict[str, Any] = {"count": len(tokens), "max_model_len": context_limit(served), "tokens": tokens}
    if _flag(body, "return_token_strs", False):
        out["token_strs"] = [str(t) for t in served.tokenizer.wrapper.convert_ids_to_tokens(tokens)]
    return web.json_response(out)


async def detokenize(request: web.Request) -> web.StreamResponse:
    body, served = await model_request(request)
    if not isinstance(served, ServedModel):
        return served
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise InvalidRequest("tokens must be an array of token ids", param="tokens")
    vocab = served.client.hello.vocab_size if served.client.hello else 0
    if any(t < 0 or (vocab and t >= vocab) for t in tokens):
        raise InvalidRequest(f"token ids must be from 0 to below the vocabulary size {vocab}", param="tokens")
    text = await served.in_tokenizer_thread(served.tokenizer.wrapper.decode, tokens)
    return web.json_response({"prompt": text, "content": text})


async def _chat_tokens(request: web.Request, served: ServedModel, body: dict[str, Any]) -> list[int]:
    """The prompt tokens a chat completion with these messages would send: `routes._chat_job`'s rendering."""
    if not _flag(body, "add_generation_prompt", True) or _flag(body, "continue_final_message", False):
        raise InvalidRequest(
            "only add_generation_prompt true (and no continue_final_message) is supported: it is what a chat "
            "request sends", param="add_generation_prompt",
        )  # fmt: skip
    chat = api.parse_chat_request(body, request.app[CONFIG].default_max_tokens)
    rendered = await served.tokenize(
        served.tokenizer.render_chat, chat.messages, tools=chat.tools, template_kwargs=chat.template_kwargs,
        max_hints=0, token_limit=context_limit(served),
    )  # fmt: skip
    return rendered.tokens


async def _text_tokens(served: ServedModel, body: dict[str, Any], field: str, add_special: bool) -> list[int]:
    """A raw text's tokens, its control tokens kept (as a /v1/completions string prompt)."""
    text = body.get(field)
    if not isinstance(text, str):
        raise InvalidRequest(f"{field} must be a string", param=field)
    check_text_size(len(text), served.tokenizer.max_token_chars, context_limit(served), field)
    if add_special:
        return await served.in_tokenizer_thread(served.tokenizer.encode_text, text)
    ids = await served.in_tokenizer_thread(served.tokenizer.wrapper.encode, text, add_special_tokens=False)
    return [int(t) for t in ids]


async def _llama_cpp_tokens(served: ServedModel, body: dict[str, Any]) -> list[Any]:
    tokens = await _text_tokens(served, body, "content", _flag(body, "add_special", False))
    if not _flag(body, "with_pieces", False):
        return tokens
    decode = served.tokenizer.wrapper.decode
    return [{"id": t, "piece": decode([t])} for t in tokens]


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false", param=name)
    return value


def add_tokenize_routes(app: web.Application) -> None:
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/tokenize", tokenize)
        app.router.add_post(f"{prefix}/detokenize", detokenize)
