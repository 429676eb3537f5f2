"""Where a Milvus collection lives and how it is indexed, written as one string (``--vectors``).

Forms (parsed with :mod:`urllib.parse`)::

    milvus://[USER:PASSWORD@]HOST[:PORT]/COLLECTION[?OPTIONS]    a Milvus server (port 19530)
    milvus+https://...                                          the same over TLS
    milvus-lite:///ABS/PATH/vectors.db[?collection=NAME&...]     Milvus Lite: embedded, one folder
    PATH.db                                                      Milvus Lite, collection 'regions'

OPTIONS are ``KEY=VALUE`` pairs:

- ``index``: the vector index, fixed when the collection is created: ``FLAT`` (default: exact,
  the same top-k as FAISS's default), ``HNSW``, ``IVF_FLAT``, ``IVF_SQ8``, ``IVF_PQ``, and on
  servers built with GPU support ``GPU_CAGRA``, ``GPU_IVF_FLAT``, ``GPU_IVF_PQ``,
  ``GPU_BRUTE_FORCE``; also ``AUTOINDEX``;
- search parameters, free to change between runs: ``ef`` (HNSW), ``nprobe`` (IVF),
  ``itopk_size`` / ``search_width`` (CAGRA);
- any other key is a build parameter of the index (``M``, ``efConstruction``, ``nlist``, ``m``,
  ``nbits``, ``graph_degree``, ...);
- ``consistency``: ``Strong`` (default), ``Bounded``, ``Session`` or ``Eventually`` (see
  :mod:`regionsearch.store.milvus` for why Strong);
- ``db`` (server database), ``timeout`` (seconds for connecting and each call, default 30).

A Milvus Lite location must be a file path (the ``.db`` folder Milvus Lite keeps its data in);
relative paths are made absolute against the working directory when parsed.

Credentials are never written to disk. An index records its location with the password removed
(:func:`without_password`: ``milvus://USER@HOST:PORT/COLLECTION?...``, the user name kept so the
record says whom to authenticate as), and messages show :attr:`MilvusLocation.display` (password
as ``***``). The password is taken when the location is opened: from the URL given on the
command line (``--vectors``) or in ``REGIONSEARCH_VECTORS``, else from the environment variable
``REGIONSEARCH_MILVUS_PASSWORD`` (for a recorded ``USER@`` location), or a whole pymilvus token
(``USER:PASSWORD`` or an API key) from ``REGIONSEARCH_MILVUS_TOKEN`` for a location without a
user.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from regionsearch.errors import RegionSearchError

SERVER_SCHEMES = {"milvus": "http", "milvus+http": "http", "milvus+https": "https"}
LITE_SCHEME = "milvus-lite"
LITE_SUFFIX = ".db"
DEFAULT_PORT = 19530
DEFAULT_COLLECTION = "regions"
DEFAULT_INDEX = "FLAT"
DEFAULT_CONSISTENCY = "Strong"
DEFAULT_TIMEOUT_S = 30.0
CONSISTENCY_LEVELS = ("Strong", "Bounded", "Session", "Eventually")
INDEX_TYPES = frozenset(
    {
        "FLAT",
        "AUTOINDEX",
        "HNSW",
        "HNSW_SQ",
        "IVF_FLAT",
        "IVF_SQ8",
        "IVF_PQ",
        "SCANN",
        "DISKANN",
        "GPU_CAGRA",
        "GPU_IVF_FLAT",
        "GPU_IVF_PQ",
        "GPU_BRUTE_FORCE",
    }
)
#: Query keys that are search-time parameters (the rest, except the reserved ones, build the index).
SEARCH_KEYS = frozenset({"ef", "nprobe", "itopk_size", "search_width", "search_list", "level"})
RESERVED_KEYS = frozenset({"collection", "index", "consistency", "db", "timeout"})
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
#: Environment variables holding the password (for ``USER@`` locations) or a whole token.
PASSWORD_ENV = "REGIONSEARCH_MILVUS_PASSWORD"
TOKEN_ENV = "REGIONSEARCH_MILVUS_TOKEN"
HIDDEN = "***"


class MilvusLocationError(RegionSearchError, ValueError):
    """A Milvus location string that cannot be used (the message says what to write)."""


@dataclass(frozen=True)
class MilvusLocation:
    """A parsed Milvus location: where to connect, which collection, how to index and search."""

    uri: str  # what MilvusClient is given: http(s)://host:port, or the Lite folder path
    collection: str
    lite: bool
    display: str  # the location as written, password hidden (for messages and stats)
    token: str = field(default="", repr=False)  # USER:PASSWORD or an API key; never shown
    db_name: str = ""
    index_type: str | None = None  # None: the collection's own, FLAT for a new one
    build_params: dict[str, Any] = field(default_factory=dict)
    search_params: dict[str, Any] = field(default_factory=dict)
    consistency: str = DEFAULT_CONSISTENCY
    timeout: float = DEFAULT_TIMEOUT_S

    @property
    def path(self) -> Path | None:
        """The Milvus Lite folder (None for a server)."""
        return Path(self.uri) if self.lite else None

    def scrub(self, text: str) -> str:
        """``text`` (e.g. a client library's error) with the token and password masked."""
        secrets = {self.token, self.token.partition(":")[2]} - {""}
        for secret in sorted(secrets, key=len, reverse=True):
            text = text.replace(secret, HIDDEN)
        return text

    def with_index(self, index_type: str | None, build_params: dict[str, Any]) -> MilvusLocation:
        """This location with another index (from a factory string), URL options winning."""
        if index_type is None or self.index_type is not None:
            return self
        return replace(
            self, index_type=index_type, build_params={**build_params, **self.build_params}
        )


def is_milvus_location(location: str) -> bool:
    """Whether ``location`` is one of the forms above (for the backend registry)."""
    scheme = location.split("://", 1)[0].lower() if "://" in location else ""
    if scheme in SERVER_SCHEMES or scheme == LITE_SCHEME:
        return True
    return not scheme and location.lower().endswith(LITE_SUFFIX)


def _value(raw: str) -> Any:
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            continue
    return raw


def _name(value: str, what: str, location: str) -> str:
    if not _NAME.match(value):
        raise MilvusLocationError(
            f"{what} {value!r} in {location!r} is not a Milvus name (letters, digits and "
            "underscores, starting with a letter or underscore)"
        )
    return value


def without_password(location: str) -> str:
    """``location`` with any URL password removed (``USER:PW@`` -> ``USER@``), else unchanged.

    This is the form an index records and error messages quote; any ``scheme://`` location
    is handled, so no engine's credentials reach the manifest."""
    text = str(location)
    if "://" not in text:
        return text
    parts = urlsplit(text)
    if "@" not in parts.netloc:
        return text
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    netloc = f"{user}@{hostport}" if user else hostport
    return parts._replace(netloc=netloc).geturl()


def parse_milvus_url(location: str, env: Mapping[str, str] | None = None) -> MilvusLocation:
    """Parse ``location`` (see the module docstring); a clear error names what is wrong.

    ``env`` (default: ``os.environ``) supplies the password or token a location without one
    needs; error messages quote the location with its password removed."""
    raw = str(location).strip()
    text = without_password(raw)
    if not raw:
        raise MilvusLocationError("empty Milvus location")
    if "://" not in text:
        if not text.lower().endswith(LITE_SUFFIX):
            raise MilvusLocationError(
                f"{text!r} is not a Milvus location: use milvus://HOST:19530/COLLECTION or "
                f"milvus-lite:///ABS/PATH/vectors.db (or a path ending in {LITE_SUFFIX})"
            )
        path = Path(text).expanduser().absolute()
        return MilvusLocation(
            uri=str(path), collection=DEFAULT_COLLECTION, lite=True, display=str(path)
        )
    parts = urlsplit(raw)
    scheme = parts.scheme.lower()
    options = _options(parts.query, text)
    if scheme == LITE_SCHEME:
        return _lite(parts, options, text)
    if scheme not in SERVER_SCHEMES:
        raise MilvusLocationError(
            f"unknown scheme {parts.scheme!r} in {text!r}: use milvus://, milvus+https:// or "
            "milvus-lite:///"
        )
    return _server(parts, options, text, os.environ if env is None else env)


def _options(query: str, text: str) -> dict[str, str]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as exc:
        raise MilvusLocationError(f"bad options {query!r} in {text!r}: KEY=VALUE&...") from exc
    options: dict[str, str] = {}
    for key, value in pairs:
        if key in options:
            raise MilvusLocationError(f"option {key!r} given twice in {text!r}")
        if not value:
            raise MilvusLocationError(f"option {key!r} has no value in {text!r}")
        options[key] = value
    return options


def _common(options: dict[str, str], text: str) -> dict[str, Any]:
    """The options shared by both forms (index, its parameters, consistency, timeout, db)."""
    out: dict[str, Any] = {"build_params": {}, "search_params": {}}
    index = options.get("index")
    if index is not None:
        out["index_type"] = normalize_index_type(index, text)
    level = options.get("consistency", DEFAULT_CONSISTENCY)
    match = [c for c in CONSISTENCY_LEVELS if c.lower() == level.lower()]
    if not match:
        raise MilvusLocationError(
            f"consistency {level!r} in {text!r}: one of {', '.join(CONSISTENCY_LEVELS)}"
        )
    out["consistency"] = match[0]
    if "timeout" in options:
        timeout = _value(options["timeout"])
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise MilvusLocationError(f"timeout {options['timeout']!r} in {text!r}: seconds > 0")
        out["timeout"] = float(timeout)
    if "db" in options:
        out["db_name"] = _name(options["db"], "database", text)
    for key, raw in options.items():
        if key in RESERVED_KEYS:
            continue
        target = "search_params" if key in SEARCH_KEYS else "build_params"
        out[target][key] = _value(raw)
    return out


def _lite(parts: Any, options: dict[str, str], text: str) -> MilvusLocation:
    if parts.netloc:
        raise MilvusLocationError(
            f"{text!r}: a Milvus Lite location is a file path, milvus-lite:///ABS/PATH/vectors.db "
            f"(three slashes; {urlsplit(text).netloc!r} was read as a host)"
        )
    if not parts.path or parts.path.endswith("/"):
        raise MilvusLocationError(f"{text!r} names no file: milvus-lite:///ABS/PATH/vectors.db")
    if not parts.path.lower().endswith(LITE_SUFFIX):
        raise MilvusLocationError(f"{text!r}: a Milvus Lite file name ends in {LITE_SUFFIX}")
    if "db" in options:
        raise MilvusLocationError(f"{text!r}: 'db' is for a Milvus server, not Milvus Lite")
    path = Path(unquote(parts.path)).expanduser().absolute()
    collection = _name(options.get("collection", DEFAULT_COLLECTION), "collection", text)
    shown = f"{LITE_SCHEME}://{quote(str(path))}"
    if collection != DEFAULT_COLLECTION:
        shown += f"?collection={collection}"
    return MilvusLocation(
        uri=str(path), collection=collection, lite=True, display=shown, **_common(options, text)
    )


def _token(parts: Any, text: str, env: Mapping[str, str]) -> str:
    """The pymilvus token: ``USER:PASSWORD`` from the URL or :data:`PASSWORD_ENV`, else
    :data:`TOKEN_ENV` for a location without a user ("" : no authentication)."""
    if parts.username is None:
        return env.get(TOKEN_ENV, "")
    user = unquote(parts.username)
    password = unquote(parts.password) if parts.password is not None else env.get(PASSWORD_ENV)
    if password is None:
        raise MilvusLocationError(
            f"{text!r} names user {user!r} but no password: give the full URL "
            f"(milvus://{user}:PASSWORD@...) with --vectors or REGIONSEARCH_VECTORS, or set "
            f"{PASSWORD_ENV} (an index records its location without the password)"
        )
    return f"{user}:{password}"


def _server(
    parts: Any, options: dict[str, str], text: str, env: Mapping[str, str]
) -> MilvusLocation:
    if not parts.hostname:
        raise MilvusLocationError(f"{text!r} names no host: milvus://HOST:19530/COLLECTION")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as exc:
        raise MilvusLocationError(f"bad port in {text!r}: {exc}") from exc
    name = parts.path.strip("/")
    if not name:
        raise MilvusLocationError(f"{text!r} names no collection: milvus://HOST:PORT/COLLECTION")
    if "collection" in options:
        raise MilvusLocationError(
            f"{text!r}: on a server the collection is the path (milvus://HOST:PORT/COLLECTION)"
        )
    collection = _name(name, "collection", text)
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    token = _token(parts, text, env)
    user = f"{parts.username}:{HIDDEN}@" if parts.username is not None else ""
    scheme = parts.scheme.lower()
    return MilvusLocation(
        uri=f"{SERVER_SCHEMES[scheme]}://{host}:{port}",
        collection=collection,
        lite=False,
        display=f"{scheme}://{user}{host}:{port}/{collection}",
        token=token,
        **_common(options, text),
    )


def normalize_index_type(name: str, where: str = "") -> str:
    """``name`` as Milvus spells it (``hnsw`` -> ``HNSW``); a clear error for unknown ones."""
    upper = name.strip().upper()
    if upper not in INDEX_TYPES:
        at = f" in {where!r}" if where else ""
        raise MilvusLocationError(
            f"unknown Milvus index type {name!r}{at}: one of {', '.join(sorted(INDEX_TYPES))}"
        )
    return upper


def index_from_factory(factory: str | None) -> tuple[str | None, dict[str, Any]]:
    """The Milvus index for an index description given as ``factory``.

    Accepts a Milvus index type (``HNSW``) or the FAISS factory strings that have a Milvus
    equivalent (``Flat`` / ``IDMap2,Flat`` -> FLAT, ``HNSW32`` -> HNSW M=32, ``IVF1024,Flat``
    -> IVF_FLAT nlist=1024), so a manifest written for FAISS reads the same. ``None``: no
    preference.
    """
    if factory is None or not factory.strip():
        return None, {}
    f = re.sub(r"\s+", "", factory)
    if f.upper() in INDEX_TYPES:
        return f.upper(), {}
    f = re.sub(r"^IDMap2?,", "", f)
    if f == "Flat":
        return "FLAT", {}
    if m := re.fullmatch(r"HNSW(\d+)(,Flat)?", f):
        return "HNSW", {"M": int(m.group(1))}
    if m := re.fullmatch(r"IVF(\d+),Flat", f):
        return "IVF_FLAT", {"nlist": int(m.group(1))}
    raise MilvusLocationError(
        f"FAISS factory {factory!r} has no Milvus equivalent here: choose the Milvus index in "
        "the location (e.g. milvus://HOST:19530/regions?index=HNSW&M=32&ef=128)"
    )
