"""Streaming multipart/related parsing (RFC 2387) on top of python-multipart's push parser.

``MultipartStream.feed`` turns each received chunk into a list of events (part begins with its headers,
part data, part ends, body ends). Events of one chunk never hold more than that chunk's bytes, so the
caller can process them with backpressure and bounded memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser

MAX_PART_HEADER_BYTES = 16 * 1024
MAX_PREAMBLE_BYTES = 64 * 1024


class MalformedMultipartError(ValueError):
    """The body is not a well-formed multipart message."""


@dataclass(frozen=True, slots=True)
class PartBegin:
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class PartData:
    data: bytes


@dataclass(frozen=True, slots=True)
class PartEnd:
    pass


@dataclass(frozen=True, slots=True)
class BodyEnd:
    pass


Event = PartBegin | PartData | PartEnd | BodyEnd


@dataclass
class _State:
    events: list[Event] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    name: bytearray = field(default_factory=bytearray)
    value: bytearray = field(default_factory=bytearray)
    header_bytes: int = 0
    in_part: bool = False
    ended: bool = False


class MultipartStream:
    """Incremental multipart parser producing events."""

    def __init__(self, boundary: str) -> None:
        if not 1 <= len(boundary) <= 70:
            raise MalformedMultipartError("the multipart boundary must be 1 to 70 characters long")
        st = self._st = _State()
        self._delimiter = b"--" + boundary.encode("latin-1")
        self._preamble: bytearray | None = bytearray()  # None once the first delimiter was found

        def header_field(data: bytes, start: int, end: int) -> None:
            st.name += data[start:end]
            self._count(end - start)

        def header_value(data: bytes, start: int, end: int) -> None:
            st.value += data[start:end]
            self._count(end - start)

        def header_end() -> None:
            st.headers[st.name.decode("latin-1").strip().lower()] = st.value.decode("latin-1").strip()
            st.name.clear()
            st.value.clear()

        def part_begin() -> None:
            st.headers = {}
            st.header_bytes = 0
            st.in_part = True

        def headers_finished() -> None:
            st.events.append(PartBegin(st.headers))

        def part_data(data: bytes, start: int, end: int) -> None:
            if end > start:
                st.events.append(PartData(bytes(data[start:end])))

        def part_end() -> None:
            st.in_part = False
            st.events.append(PartEnd())

        def body_end() -> None:
            st.ended = True
            st.events.append(BodyEnd())

        self._parser = MultipartParser(
            boundary.encode("latin-1"),
            {
                "on_part_begin": part_begin,
                "on_header_field": header_field,
                "on_header_value": header_value,
                "on_header_end": header_end,
                "on_headers_finished": headers_finished,
                "on_part_data": part_data,
                "on_part_end": part_end,
                "on_end": body_end,
            },
        )

    def _count(self, n: int) -> None:
        self._st.header_bytes += n
        if self._st.header_bytes > MAX_PART_HEADER_BYTES:
            raise MalformedMultipartError("a part's headers are too large")

    @property
    def ended(self) -> bool:
        return self._st.ended

    def feed(self, chunk: bytes) -> list[Event]:
        """Parse a chunk; return the events it completed."""
        if self._st.ended:
            return []  # RFC 2046: anything after the close delimiter is an epilogue, ignored
        if self._preamble is not None:
            chunk = self._skip_preamble(chunk)
            if not chunk:
                return []
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise MalformedMultipartError("the multipart body is malformed") from exc
        events, self._st.events = self._st.events, []
        return events

    def _skip_preamble(self, chunk: bytes) -> bytes:
        """Drop an RFC 2046 preamble (text before the first delimiter), which python-multipart rejects."""
        assert self._preamble is not None
        buf = self._preamble + chunk
        if buf.startswith(self._delimiter):
            self._preamble = None
            return bytes(buf)
        at = buf.find(b"\r\n" + self._delimiter)
        if at >= 0:
            self._preamble = None
            return bytes(buf[at + 2 :])
        if len(buf) > MAX_PREAMBLE_BYTES:
            raise MalformedMultipartError("no multipart boundary found at the start of the body")
        self._preamble = buf
        return b""

    def close(self) -> None:
        """Check that the body ended with the closing boundary."""
        if not self._st.ended:
            raise MalformedMultipartError("the multipart body ended before its closing boundary")
