"""The ServiceTitan-shaped answers of the simulator, once a request has passed its app-key and token checks.

Paged lists (``page``, ``pageSize``, ``hasMore``, ``data``), single items, writes, and RFC 7807-style problem bodies
with a ``traceId`` as ServiceTitan sends them; plus the resources the proxy's tests use: ``echo`` (the request as
received), ``download`` (a streamed body), ``redirect`` and ``setcookie``. They are matched on the first segment after
the tenant id: ``/crm/v2/tenant/1000001/echo/anything``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets

from aiohttp import web

ITEMS_PER_RESOURCE = 120  # every collection holds this many fake items
MAX_PAGE_SIZE = 500  # ServiceTitan's documented maximum
DEFAULT_PAGE_SIZE = 50
MISSING_ID_ABOVE = 1_000_000  # GET .../{resource}/{id} answers 404 for larger ids
DOWNLOAD_PATTERN = b"0123456789abcdef"
FAKE_REDIRECT = "https://files.example.invalid/attachments/42?sig=simulated"

# ServiceTitan's error bodies point `type` at the RFC section of their status.
_PROBLEM_TYPES = {
    400: "rfc7231#section-6.5.1",
    401: "rfc7235#section-3.1",
    403: "rfc7231#section-6.5.3",
    404: "rfc7231#section-6.5.4",
    405: "rfc7231#section-6.5.5",
}


def is_digits(s: str) -> bool:
    return s.isascii() and s.isdigit()  # str.isdigit alone accepts "²"


def problem(status: int, title: str, headers: dict | None = None, errors: dict | None = None) -> web.Response:
    body = {
        "type": f"https://tools.ietf.org/html/{_PROBLEM_TYPES[status]}",
        "title": title,
        "status": status,
        "traceId": secrets.token_hex(16),
        "errors": errors or {},
        "data": {},
    }
    return web.json_response(body, status=status, headers=headers)


def _int_param(request: web.Request, name: str, default: int) -> int | None:
    """The query parameter as a non-negative int, the default when absent, None when malformed."""
    raw = request.query.get(name)
    if raw is None:
        return default
    return int(raw) if is_digits(raw) else None


async def answer(request: web.Request) -> web.StreamResponse:
    """The answer to an authorised API request: a special resource, or a ServiceTitan-like one."""
    segments = [s for s in request.match_info["rest"].split("/") if s]
    special = segments[0] if segments else ""
    if special == "echo":
        return await _echo(request)
    if special == "download":
        return await _download(request)
    if special == "redirect":
        return web.Response(status=302, headers={"Location": FAKE_REDIRECT})
    if special == "setcookie":
        return web.json_response({"ok": True}, headers={"Set-Cookie": "st_sim_session=simulated; Path=/; HttpOnly"})
    return await _resource(request, segments)


async def _echo(request: web.Request) -> web.Response:
    digest, length = hashlib.sha256(), 0
    async for chunk in request.content.iter_chunked(65536):  # streamed: 50 MB bodies are fine
        digest.update(chunk)
        length += len(chunk)
    headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers]  # as sent, duplicates kept
    return web.json_response(
        {
            "method": request.method,
            "path": request.raw_path,
            "headers": headers,
            "body_sha256": digest.hexdigest(),
            "body_length": length,
        }
    )


async def _download(request: web.Request) -> web.StreamResponse:
    size = _int_param(request, "bytes", 1024)
    chunk = _int_param(request, "chunk", 65536)
    try:
        delay = float(request.query.get("delay", "0"))
    except ValueError:
        delay = -1
    if size is None or not chunk or not delay >= 0:
        return problem(400, "bytes must be a non-negative integer, chunk a positive one, delay seconds")
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
    await response.prepare(request)
    if request.method == "HEAD":  # aiohttp's StreamResponse would send the bytes even for HEAD (RFC 9110 9.3.2)
        await response.write_eof()
        return response
    block = DOWNLOAD_PATTERN * (chunk // len(DOWNLOAD_PATTERN) + 2)
    sent = 0
    while sent < size:
        n = min(chunk, size - sent)
        start = sent % len(DOWNLOAD_PATTERN)  # byte i of the stream is DOWNLOAD_PATTERN[i % 16]
        await response.write(block[start : start + n])
        sent += n
        if delay > 0 and sent < size:
            await asyncio.sleep(delay)
    await response.write_eof()
    return response


async def _resource(request: web.Request, segments: list[str]) -> web.StreamResponse:
    method = request.method
    if method in ("POST", "PUT", "PATCH"):
        raw = await request.read()
        try:
            received = json.loads(raw) if raw.strip() else None
        except ValueError:
            return problem(400, "One or more validation errors occurred.", errors={"body": ["invalid JSON"]})
        return web.json_response({"received": received, "method": method}, status=201 if method == "POST" else 200)
    if method == "DELETE":
        return web.Response(status=204)
    if method not in ("GET", "HEAD"):
        return problem(405, "Method Not Allowed")
    if segments and is_digits(segments[-1]):
        item_id = int(segments[-1])
        if item_id > MISSING_ID_ABOVE or len(segments) < 2:
            return problem(404, "Not Found")
        return web.json_response({"id": item_id, "name": f"{segments[-2]} {item_id}"})
    page = _int_param(request, "page", 1)
    page_size = _int_param(request, "pageSize", DEFAULT_PAGE_SIZE)
    errors: dict[str, list[str]] = {}
    if not page:
        errors["page"] = ["must be an integer of at least 1"]
    if not page_size or page_size > MAX_PAGE_SIZE:
        errors["pageSize"] = [f"must be an integer between 1 and {MAX_PAGE_SIZE}"]
    if errors or page is None or page_size is None:
        return problem(400, "One or more validation errors occurred.", errors=errors)
    resource = segments[-1] if segments else "items"
    first = (page - 1) * page_size + 1
    last = min(page * page_size, ITEMS_PER_RESOURCE)
    include_total = request.query.get("includeTotal", "").lower() == "true"
    return web.json_response(
        {
            "page": page,
            "pageSize": page_size,
            "hasMore": last < ITEMS_PER_RESOURCE,
            "totalCount": ITEMS_PER_RESOURCE if include_total else None,
            "data": [{"id": i, "name": f"{resource} {i}"} for i in range(first, last + 1)],
        }
    )
