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
    """python-multipart callbacks that keep the bytes of the ``file`` field only."""

    limit: int
    data: bytearray = field(default_factory=bytearray)
    files: int = 0
    _in_file: bool = False
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
        self._in_file = False
        self._disposition = b""

    def _header_end(self) -> None:
        if bytes(self._header).lower() == b"content-disposition":
            self._disposition = bytes(self._value)
        self._header.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._in_file = options.get(b"name") == FIELD.encode()
        if self._in_file:
            self.files += 1

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_file and self.files == 1:
            if len(self.data) + (end - start) > self.limit:
                raise _TooLarge
            self.data.extend(data[start:end])


def check_content_length(request: Request, limit: int) -> None:
    """Refuse a declared body size over the limit before reading any of it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + OVERHEAD:
        raise too_large(limit)


async def read_upload(request: Request, limit: int) -> bytes:
    """The bytes of the multipart field ``file`` (at most ``limit``); 413/422 otherwise."""
    check_content_length(request, limit)
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"send the photo as multipart/form-data, in a field named {FIELD!r}",
        )
    collector = _Collector(limit)
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
    if collector.files != 1:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"expected exactly one file in the field {FIELD!r}, got {collector.files}",
        )
    if not collector.data:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "empty file")
    return bytes(collector.data)
