"""Read the one file of a multipart upload while streaming, never past the size limit.

FastAPI's ``UploadFile`` parameters make Starlette read (and spool to disk) the whole body before
any check runs, so a client could fill the disk with one request. Here the route checks the key
and origin first, refuses a too-large ``Content-Length`` before reading, and parses the body
with python-multipart as it arrives, keeping the file part in memory and stopping at the first
byte over the limit: nothing reaches the disk until the whole file is known to be small enough.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import HTTPException, Request, status
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header

FIELD = "file"
#: Body bytes allowed beyond the file itself: boundaries, part headers, small extra fields.
OVERHEAD = 16 * 1024


def multipart_body(properties: dict, encoding: dict | None = None) -> dict:
    """``openapi_extra`` documenting a required multipart body with these field schemas (the
    field ``file`` required), since the routes read the body themselves."""
    media: dict = {"schema": {"type": "object", "required": [FIELD], "properties": properties}}
    if encoding:
        media["encoding"] = encoding
    return {"requestBody": {"required": True, "content": {"multipart/form-data": media}}}


def size_in_words(n: int) -> str:
    """``20 MB``, ``195 KB``, ``512 bytes`` (binary units, as ``--max-upload-mb``)."""
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.3g} MB"
    if n >= 1024:
        return f"{n / 1024:.3g} KB"
    return f"{n} bytes"


def too_large(limit: int) -> HTTPException:
    return HTTPException(
        status.HTTP_413_CONTENT_TOO_LARGE,
        f"upload too large: the limit is {size_in_words(limit)} (serve --max-upload-mb)",
    )


class _TooLarge(Exception):
    pass


@dataclass
class _Collector:
    """python-multipart callbacks that keep the bytes of the wanted fields only (``limit``
    bytes in all); the names of other fields are noted."""

    limit: int
    names: frozenset[str] = frozenset({FIELD})
    parts: list[tuple[str, bytearray]] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    kept: int = 0
    _current: bytearray | None = None
    _header: bytearray = field(default_factory=bytearray)
    _value: bytearray = field(default_factory=bytearray)
    _disposition: bytes = b""

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._header.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
        }

    def _part_begin(self) -> None:
        self._current = None
        self._disposition = b""

    def _header_end(self) -> None:
        if bytes(self._header).lower() == b"content-disposition":
            self._disposition = bytes(self._value)
        self._header.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name in self.names:
            self._current = bytearray()
            self.parts.append((name, self._current))
        elif name not in self.unknown:
            self.unknown.append(name[:40])

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current is not None:
            self.kept += end - start
            if self.kept > self.limit:
                raise _TooLarge
            self._current.extend(data[start:end])

    def values(self, name: str) -> list[bytes]:
        return [bytes(v) for n, v in self.parts if n == name]


def check_content_length(request: Request, limit: int) -> None:
    """Refuse a declared body size over the limit before reading any of it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + OVERHEAD:
        raise too_large(limit)


async def read_form(request: Request, limit: int, names: frozenset[str]) -> _Collector:
    """The parts of a multipart body whose field is in ``names`` (``limit`` bytes in all,
    413 beyond; 422 for another content type or a malformed body)."""
    check_content_length(request, limit)
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"send the photo as multipart/form-data, in a field named {FIELD!r}",
        )
    collector = _Collector(limit, names)
    parser = MultipartParser(boundary, collector.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit + OVERHEAD:
                raise _TooLarge
            parser.write(chunk)
        parser.finalize()
    except _TooLarge:
        raise too_large(limit) from None
    except MultipartParseError as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"malformed multipart body: {exc}"
        ) from None
    return collector


def one_file(form: _Collector, name: str = FIELD) -> bytes:
    """The bytes of the one non-empty part ``name`` of ``form`` (422 otherwise)."""
    found = form.values(name)
    if len(found) != 1:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"expected exactly one file in the field {name!r}, got {len(found)}",
        )
    if not found[0]:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "empty file")
    return found[0]


async def read_upload(request: Request, limit: int) -> bytes:
    """The bytes of the multipart field ``file`` (at most ``limit``); 413/422 otherwise."""
    return one_file(await read_form(request, limit, frozenset({FIELD})))
