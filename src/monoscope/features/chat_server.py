"""A minimal OpenAI-compatible chat-completions server around a `transformers` causal LM.

Enough of the API for `monoscope explain` and any OpenAI client: `POST /v1/chat/completions` (no streaming,
n=1) and `GET /v1/models`. Standard library HTTP server in a background thread, bound to 127.0.0.1 by
default; requests are answered one generation at a time.

    from monoscope.model import load_model
    lm = load_model("smollm2-135m-instruct")
    with ChatServer(lm.model, lm.tokenizer, model_name="smollm2-135m-instruct") as server:
        print(server.base_url)   # http://127.0.0.1:PORT/v1
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from ..errors import MonoscopeError

_MAX_BODY = 16 * 1024 * 1024


class _RequestError(Exception):
    def __init__(self, status: int, message: str, code: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.kind = status, message, code, kind


class ChatServer:
    """Serve `model` + `tokenizer` as model `model_name`; `port=0` picks a free port (see `.port`, `.base_url`).

    `truncate_prompt=True` keeps the last tokens of prompts longer than the model's context instead of
    answering 400 `context_length_exceeded` (useful for tiny test models with short contexts).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        model_name: str = "local",
        host: str = "127.0.0.1",
        port: int = 0,
        max_tokens_limit: int = 1024,
        truncate_prompt: bool = False,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_tokens_limit = max_tokens_limit
        self.truncate_prompt = truncate_prompt
        self.created = int(time.time())
        self._generate_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802
                path = self.path.split("?")[0].rstrip("/")
                if path in ("/v1/models", "/models"):
                    self._send(200, server.models_response())
                elif path in ("/health", "/v1/health", ""):
                    self._send(200, {"status": "ok"})
                else:
                    self._send(404, _error_body("no such route", "not_found", "invalid_request_error"))

            def do_POST(self) -> None:  # noqa: N802
                path = self.path.split("?")[0].rstrip("/")
                if path not in ("/v1/chat/completions", "/chat/completions"):
                    self._send(404, _error_body("no such route", "not_found", "invalid_request_error"))
                    return
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    if length <= 0 or length > _MAX_BODY:
                        raise _RequestError(400, "the request needs a JSON body", "invalid_body")
                    try:
                        body = json.loads(self.rfile.read(length))
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        raise _RequestError(400, "the body is not valid JSON", "invalid_json") from None
                    self._send(200, server.complete(body))
                except _RequestError as err:
                    self._send(err.status, _error_body(err.message, err.code, err.kind))
                except Exception as err:  # noqa: BLE001 - a server answers 500, it does not die
                    self._send(500, _error_body(f"generation failed: {type(err).__name__}: {err}", "internal_error", "server_error"))

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        try:
            self._httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as err:
            raise MonoscopeError(f"cannot listen on {host}:{port} ({err.strerror or err}); choose another port") from err
        self._httpd.daemon_threads = True
        self.host, self.port = self._httpd.server_address[:2]

    # ------------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> "ChatServer":
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, name="monoscope-chat-server", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> "ChatServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------ API

    def models_response(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created, "owned_by": "monoscope"}]}

    def _prompt_ids(self, messages: list[dict[str, Any]]) -> torch.Tensor:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            out = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            return out["input_ids"]
        # No chat template: a plain transcript that ends where the assistant speaks.
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        ids = tok(text, return_tensors="pt").input_ids
        bos = getattr(tok, "bos_token_id", None)
        if bos is not None and (ids.shape[1] == 0 or int(ids[0, 0]) != bos):
            ids = torch.cat([torch.tensor([[bos]]), ids], dim=1)
        return ids

    def _context_length(self) -> int | None:
        cfg = self.model.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            if getattr(cfg, attr, None):
                return int(getattr(cfg, attr))
        return None

    def complete(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _RequestError(400, "the body must be a JSON object", "invalid_body")
        name = body.get("model")
        if name is not None and name != self.model_name:
            raise _RequestError(404, f"The model `{name}` does not exist; this server serves `{self.model_name}`", "model_not_found")
        if body.get("stream"):
            raise _RequestError(400, "streaming is not supported by this server", "unsupported")
        if int(body.get("n", 1) or 1) != 1:
            raise _RequestError(400, "only n=1 is supported", "unsupported")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _RequestError(400, "`messages` must be a non-empty list", "invalid_messages")
        clean = []
        for m in messages:
            if not isinstance(m, dict) or "role" not in m:
                raise _RequestError(400, "each message needs a role and content", "invalid_messages")
            content = m.get("content") or ""
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            clean.append({"role": str(m["role"]), "content": str(content)})
        try:
            max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 256)
            temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
            top_p = float(body.get("top_p") if body.get("top_p") is not None else 1.0)
        except (TypeError, ValueError):
            raise _RequestError(400, "max_tokens, temperature and top_p must be numbers", "invalid_parameters") from None
        if max_tokens < 1:
            raise _RequestError(400, "max_tokens must be at least 1", "invalid_parameters")
        max_tokens = min(max_tokens, self.max_tokens_limit)
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or []) if isinstance(s, str) and s]

        ids = self._prompt_ids(clean)
        context = self._context_length()
        if context is not None and ids.shape[1] + max_tokens > context:
            room = context - max_tokens
            if not self.truncate_prompt or room < 1:
                raise _RequestError(
                    400,
                    f"This model's maximum context length is {context} tokens; the prompt has {ids.shape[1]} and max_tokens is {max_tokens}",
                    "context_length_exceeded",
                )
            ids = ids[:, -room:]
        device = next(self.model.parameters()).device
        ids = ids.to(device)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "pad_token_id": pad if pad is not None else eos}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with self._generate_lock, torch.inference_mode():
            if body.get("seed") is not None:
                torch.manual_seed(int(body["seed"]))
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        new = out[0, ids.shape[1]:]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        finish = "length" if len(new) >= max_tokens else "stop"
        for s in stops:
            cut = text.find(s)
            if cut >= 0:
                text, finish = text[:cut], "stop"
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": int(ids.shape[1]), "completion_tokens": int(len(new)), "total_tokens": int(ids.shape[1] + len(new))},
        }


def _error_body(message: str, code: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
