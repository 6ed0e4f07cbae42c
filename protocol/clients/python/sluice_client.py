"""Standard-library client for the sluice lender protocol, version 1.

Written from ``protocol/SPEC.md`` and the golden vectors in
``protocol/vectors/lender/`` only (not from the switch's source).

Layers, bottom up:

* ``HEADER``, ``RESULT_BLOCK`` and ``MESSAGES``: the layouts of SPEC §3 and §4.1,
  transcribed as one declarative table.  Each field is ``(name, size, kind, rule)``:
  ``kind`` is the wire type (§2) and ``rule`` the extra check written in the type
  column of §4.1 (Luhn, non-zero, ...; see ``_RULES``).
* ``encode_frame`` / ``decode_frame``: whole frames (header | body | HMAC-SHA256).
* ``validate_field`` and friends: the field rules of §2, raising ``FieldError``
  that names the field (and carries the number the switch would report in
  ``MALFORMED_FIELD``: body fields from 1, header fields from 101).
* ``Connection``: a small blocking, thread-based connection (logon, requests
  matched by request id, answers to the switch's ECHO_REQ and NOTIFY).
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import socket
import struct
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field as dc_field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

__all__ = [
    "VERSION", "MAGIC", "HEADER_LEN", "MAC_LEN", "MIN_FRAME_LEN", "MAX_FRAME_LEN",
    "HEADER", "RESULT_BLOCK", "MESSAGES", "TYPE_CODES", "NAMES_BY_CODE",
    "STATUS", "REASONS", "NOTIFY_KIND", "AGREEMENT_STATE", "CARD_TYPE", "FLAG_RESEND",
    "SluiceError", "FieldError", "FrameError", "MacError", "Rejected",
    "Frame", "encode_frame", "decode_frame", "compute_mac", "verify_mac",
    "frame_length", "body_length", "message_length", "response_name",
    "luhn_ok", "validate_field", "KeyRing", "RequestIds", "Connection",
]

log = logging.getLogger("sluice_client")

# ---------------------------------------------------------------------------
# Constants (§3, §9)

VERSION = 1
MAGIC = "SL"
HEADER_LEN = 48
MAC_LEN = 32
MIN_FRAME_LEN = 80      # §7 FRAMING_LOST: "length outside 80..=1024"
MAX_FRAME_LEN = 1024
FLAG_RESEND = 0x0001    # §3.1 flags bit 0; all other bits must be 0

# ---------------------------------------------------------------------------
# The layout table (§3.1, §3.3, §4.1)
#
# kinds (§2):
#   u8 u16 u64   unsigned big-endian integers
#   ascii        printable ASCII 0x20-0x7E, left-aligned, zero-padded
#   digits       ASCII '0'-'9', left-aligned, zero-padded
#   utf8         UTF-8, left-aligned, zero-padded
#   reserved     zero bytes (not exposed as a value)
#   result       the 16-byte result block (§3.3), a dict
#
# rules (the qualifiers in the type column of §4.1, defined in §2):
#   nonempty  card_type  luhn  id_no  phone  nonzero  sms_code  positive
#   cny  order_id  notify_kind

Field = Tuple[Optional[str], int, str, Optional[str]]

HEADER: List[Field] = [          # field numbers 101..110, in this order
    ("magic",        2,  "ascii",    None),
    ("version",      1,  "u8",       None),
    ("msg_type",     1,  "u8",       None),
    ("length",       2,  "u16",      None),
    ("flags",        2,  "u16",      None),
    ("request_id",   8,  "u64",      None),
    ("timestamp_ms", 8,  "u64",      None),
    ("key_id",       2,  "u16",      None),
    ("reserved",     6,  "reserved", None),
    ("merchant_no",  16, "ascii",    "nonempty"),
]
HEADER_FIELD_BASE = 101

RESULT_BLOCK: List[Field] = [
    ("status",       1, "u8",       None),
    (None,           1, "reserved", None),
    ("reason",       2, "u16",      None),
    ("field",        2, "u16",      None),
    (None,           2, "reserved", None),
    ("channel_code", 8, "ascii",    None),
]

_R = ("result", 16, "result", None)

# name -> (type code, body fields)
MESSAGES: Dict[str, Tuple[int, List[Field]]] = {
    "LOGON_REQ": (0x01, [
        ("heartbeat_s", 2, "u16", None),
        ("client_name", 16, "ascii", None),
    ]),
    "LOGON_RSP": (0x81, [
        _R,
        ("session_id", 8, "u64", None),
        ("heartbeat_s", 2, "u16", None),
        ("idle_timeout_s", 2, "u16", None),
        ("replay_window_s", 2, "u16", None),
        ("inflight_max", 2, "u16", None),
    ]),
    "LOGOFF_REQ": (0x02, []),
    "LOGOFF_RSP": (0x82, [_R]),
    "ECHO_REQ": (0x03, [("nonce", 8, "u64", None)]),
    "ECHO_RSP": (0x83, [("nonce", 8, "u64", None)]),
    "PREBIND_REQ": (0x10, [
        ("user_id", 32, "ascii", None),
        ("card_type", 1, "u8", "card_type"),
        ("bank_code", 8, "ascii", None),
        ("card_no", 19, "digits", "luhn"),
        ("id_no", 18, "ascii", "id_no"),
        ("name", 64, "utf8", "nonempty"),
        ("phone", 11, "digits", "phone"),
        ("mode", 1, "u8", "bind_mode"),
    ]),
    "PREBIND_RSP": (0x90, [
        _R,
        ("bind_ref", 8, "u64", None),
        ("agreement_id", 8, "u64", None),
    ]),
    "BIND_CONFIRM_REQ": (0x11, [
        ("bind_ref", 8, "u64", "nonzero"),
        ("sms_code", 8, "digits", "sms_code"),
    ]),
    "BIND_CONFIRM_RSP": (0x91, [
        _R,
        ("agreement_id", 8, "u64", None),
        ("channel", 8, "ascii", None),
    ]),
    "SIGN_AND_PAY_REQ": (0x12, [
        ("user_id", 32, "ascii", None),
        ("card_type", 1, "u8", "card_type"),
        ("bank_code", 8, "ascii", None),
        ("card_no", 19, "digits", "luhn"),
        ("id_no", 18, "ascii", "id_no"),
        ("name", 64, "utf8", "nonempty"),
        ("phone", 11, "digits", "phone"),
        ("order_id", 32, "ascii", "order_id"),
        ("amount", 8, "u64", "positive"),
        ("currency", 3, "ascii", "cny"),
        ("purpose", 64, "utf8", None),
    ]),
    "SIGN_AND_PAY_RSP": (0x92, [
        _R,
        ("bind_ref", 8, "u64", None),
        ("agreement_id", 8, "u64", None),
    ]),
    "AGREEMENT_QUERY_REQ": (0x13, [("agreement_id", 8, "u64", "nonzero")]),
    "AGREEMENT_QUERY_RSP": (0x93, [
        _R,
        ("agreement_id", 8, "u64", None),
        ("state", 1, "u8", None),
        ("card_type", 1, "u8", None),
        ("bank_code", 8, "ascii", None),
        ("card_last4", 4, "digits", None),
        ("primary_channel", 8, "ascii", None),
        ("backup_channel", 8, "ascii", None),
    ]),
    "AGREEMENT_CANCEL_REQ": (0x14, [("agreement_id", 8, "u64", "nonzero")]),
    "AGREEMENT_CANCEL_RSP": (0x94, [
        _R,
        ("agreement_id", 8, "u64", None),
    ]),
    "DEBIT_REQ": (0x20, [
        ("order_id", 32, "ascii", "order_id"),
        ("agreement_id", 8, "u64", "nonzero"),
        ("amount", 8, "u64", "positive"),
        ("currency", 3, "ascii", "cny"),
        ("purpose", 64, "utf8", None),
    ]),
    "DEBIT_RSP": (0xA0, [
        _R,
        ("order_id", 32, "ascii", "nonempty"),
        ("channel", 8, "ascii", None),
    ]),
    "PAYOUT_REQ": (0x21, [
        ("order_id", 32, "ascii", "order_id"),
        ("amount", 8, "u64", "positive"),
        ("currency", 3, "ascii", "cny"),
        ("card_type", 1, "u8", "card_type"),
        ("bank_code", 8, "ascii", None),
        ("card_no", 19, "digits", "luhn"),
        ("name", 64, "utf8", "nonempty"),
        ("purpose", 64, "utf8", None),
    ]),
    "PAYOUT_RSP": (0xA1, [
        _R,
        ("order_id", 32, "ascii", "nonempty"),
        ("channel", 8, "ascii", None),
    ]),
    "ORDER_QUERY_REQ": (0x22, [("order_id", 32, "ascii", "order_id")]),
    "ORDER_QUERY_RSP": (0xA2, [
        _R,
        ("order_id", 32, "ascii", "nonempty"),
        ("order_type", 1, "u8", None),
        ("amount", 8, "u64", None),
        ("channel", 8, "ascii", None),
        ("attempts", 1, "u8", None),
        ("accepted_at_ms", 8, "u64", None),
        ("finished_at_ms", 8, "u64", None),
    ]),
    "NOTIFY": (0x30, [
        ("notify_id", 8, "u64", None),
        ("kind", 1, "u8", "notify_kind"),
        _R,
        ("order_id", 32, "ascii", None),
        ("order_type", 1, "u8", None),
        ("amount", 8, "u64", None),
        ("agreement_id", 8, "u64", None),
        ("channel", 8, "ascii", None),
        ("finished_at_ms", 8, "u64", None),
    ]),
    "NOTIFY_ACK": (0xB0, [("notify_id", 8, "u64", None)]),
    "REJECT": (0x7F, [
        _R,
        ("rejected_type", 1, "u8", None),
        ("detail", 64, "ascii", None),
    ]),
}

TYPE_CODES: Dict[str, int] = {name: code for name, (code, _) in MESSAGES.items()}
NAMES_BY_CODE: Dict[int, str] = {code: name for name, code in TYPE_CODES.items()}

# Messages the lender sends as requests (L->S) and the switch sends as requests (S->L).
LENDER_REQUESTS = frozenset(n for n, c in TYPE_CODES.items() if c < 0x30)
SWITCH_REQUESTS = frozenset({"ECHO_REQ", "NOTIFY"})

# §6, §7, §4.2, §4.3, §2
STATUS = {0: "SUCCESS", 1: "FAILED", 2: "PENDING", 3: "REJECTED", 4: "BUSY"}
REASONS = {
    0: "OK", 101: "BAD_MAC", 102: "UNKNOWN_KEY", 103: "NOT_LOGGED_ON",
    104: "MERCHANT_NOT_ALLOWED", 105: "STALE_TIMESTAMP", 106: "DUPLICATE_REQUEST_ID",
    107: "MALFORMED_FIELD", 108: "UNKNOWN_MESSAGE_TYPE", 109: "BAD_LENGTH",
    110: "BAD_VERSION", 111: "FRAMING_LOST", 112: "UNEXPECTED_MESSAGE",
    201: "UNKNOWN_AGREEMENT", 202: "AGREEMENT_REVOKED", 203: "LIMIT_EXCEEDED",
    204: "NO_CHANNEL", 205: "DUPLICATE_ORDER", 206: "ORDER_CONFLICT",
    207: "CHANNEL_DECLINED", 208: "OUTCOME_UNKNOWN", 209: "ALREADY_SIGNED",
    210: "BAD_SMS_CODE", 211: "UNKNOWN_ORDER", 301: "OVERLOADED",
    302: "INTERNAL_ERROR", 303: "SHUTTING_DOWN",
}
NOTIFY_KIND = {1: "ORDER_FINAL", 2: "AGREEMENT_REVOKED"}
AGREEMENT_STATE = {0: "NONE", 1: "ACTIVE", 2: "CANCELLED", 3: "REVOKED"}
CARD_TYPE = {1: "DEBIT", 2: "CREDIT"}


def body_length(name: str) -> int:
    return sum(size for _, size, _, _ in MESSAGES[name][1])


def message_length(name: str) -> int:
    return HEADER_LEN + body_length(name) + MAC_LEN


def response_name(request_name: str) -> str:
    """Name of the response type for a request (§3.3: type code with bit 7 set)."""
    return NAMES_BY_CODE[TYPE_CODES[request_name] | 0x80]


# ---------------------------------------------------------------------------
# Errors


class SluiceError(Exception):
    """Base class of every error raised by this module."""


class FieldError(SluiceError, ValueError):
    """A field value is malformed.  ``field`` is its name ("card_no",
    "result.status", "header.flags"), ``number`` the field number the switch
    reports with MALFORMED_FIELD (body 1.., header 101..), or None."""

    def __init__(self, field: str, number: Optional[int], problem: str):
        self.field = field
        self.number = number
        self.problem = problem
        num = f" (field #{number})" if number is not None else ""
        super().__init__(f"field {field!r}{num}: {problem}")


class FrameError(SluiceError):
    """The frame as a whole is unusable: bad magic, length, version or type."""


class MacError(SluiceError):
    """The MAC trailer does not verify, or no key is known for it."""


class Rejected(SluiceError):
    """The switch answered a request with REJECT (§4.4)."""

    def __init__(self, frame: "Frame"):
        self.frame = frame
        r = frame.body["result"]
        super().__init__(
            f"REJECT {REASONS.get(r['reason'], r['reason'])} field={r['field']} "
            f"rejected_type=0x{frame.body['rejected_type']:02X} "
            f"detail={frame.body['detail']!r}"
            + (" (unsigned, advisory)" if frame.advisory else ""))


# ---------------------------------------------------------------------------
# Field rules (§2)


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _isdigits(s: str) -> bool:
    return s != "" and all("0" <= c <= "9" for c in s)


def _rule_problem(rule: str, v: Any) -> Optional[str]:
    """Return a description of the violation, or None if the value is fine."""
    if rule == "nonempty":
        return None if v != "" else "must not be empty"
    if rule == "card_type":
        return None if v in CARD_TYPE else f"card type {v} not in {sorted(CARD_TYPE)} (1 debit, 2 credit)"
    if rule == "bind_mode":
        return None if v in (0, 1) else f"bind mode {v} not in [0, 1] (0 sign, 1 backup)"
    if rule == "notify_kind":
        return None if v in NOTIFY_KIND else f"notify kind {v} not in {sorted(NOTIFY_KIND)}"
    if rule == "luhn":
        if not (_isdigits(v) and 12 <= len(v) <= 19):
            return f"card number must be 12-19 digits, got {len(v)} characters"
        return None if luhn_ok(v) else "Luhn check digit is wrong"
    if rule == "id_no":
        ok = (len(v) == 18 and _isdigits(v[:17]) and (v[17] == "X" or _isdigits(v[17])))
        return None if ok else "ID number must be 17 digits then a digit or 'X' (18 characters)"
    if rule == "phone":
        ok = len(v) == 11 and _isdigits(v) and v[0] == "1"
        return None if ok else "phone must be exactly 11 digits starting with 1"
    if rule == "nonzero":
        return None if v != 0 else "must be non-zero"
    if rule == "sms_code":
        return None if (_isdigits(v) and 4 <= len(v) <= 8) else "SMS code must be 4-8 digits"
    if rule == "positive":
        return None if v > 0 else "amount must be greater than 0 (fen)"
    if rule == "cny":
        return None if v == "CNY" else f"currency must be 'CNY', got {v!r}"
    if rule == "order_id":
        ok = 1 <= len(v) <= 32 and all(0x20 <= ord(c) <= 0x7E for c in v)
        return None if ok else "order id must be 1-32 printable ASCII characters"
    raise AssertionError(f"unknown rule {rule}")


def validate_field(message: str, name: str, value: Any) -> None:
    """Check one body field of ``message`` (type and §2 rule); raise FieldError."""
    for number, (fname, size, kind, rule) in enumerate(MESSAGES[message][1], 1):
        if fname == name:
            _encode_value(fname, number, size, kind, value)
            if rule is not None:
                p = _rule_problem(rule, value)
                if p:
                    raise FieldError(fname, number, p)
            return
    raise KeyError(f"{message} has no field {name!r}")


# ---------------------------------------------------------------------------
# Value encoding (§2)

_INT_FMT = {"u8": ">B", "u16": ">H", "u32": ">I", "u64": ">Q"}


def _encode_text(name, number, size, kind, value) -> bytes:
    if not isinstance(value, str):
        raise FieldError(name, number, f"expected str, got {type(value).__name__}")
    if "\x00" in value:
        raise FieldError(name, number, "a value cannot contain NUL (0x00 ends the value)")
    if kind == "ascii":
        bad = [c for c in value if not 0x20 <= ord(c) <= 0x7E]
        if bad:
            raise FieldError(name, number, f"not printable ASCII: {bad[0]!r}")
        raw = value.encode("ascii")
    elif kind == "digits":
        bad = [c for c in value if not "0" <= c <= "9"]
        if bad:
            raise FieldError(name, number, f"only digits 0-9 allowed, got {bad[0]!r}")
        raw = value.encode("ascii")
    else:  # utf8
        try:
            raw = value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise FieldError(name, number, f"not encodable as UTF-8: {e}") from None
    if len(raw) > size:
        raise FieldError(name, number, f"{len(raw)} bytes do not fit in {size}")
    return raw + b"\x00" * (size - len(raw))


def _encode_value(name, number, size, kind, value) -> bytes:
    if kind in _INT_FMT:
        if not isinstance(value, int) or isinstance(value, bool):
            raise FieldError(name, number, f"expected int, got {type(value).__name__}")
        if not 0 <= value < 1 << (8 * size):
            raise FieldError(name, number, f"{value} out of range for {kind}")
        return struct.pack(_INT_FMT[kind], value)
    if kind in ("ascii", "digits", "utf8"):
        return _encode_text(name, number, size, kind, value)
    if kind == "reserved":
        return b"\x00" * size
    if kind == "result":
        if not isinstance(value, dict):
            raise FieldError(name, number, "result block must be a dict")
        v = {"status": 0, "reason": 0, "field": 0, "channel_code": ""}
        unknown = set(value) - set(v)
        if unknown:
            raise FieldError(name, number, f"unknown result block keys {sorted(unknown)}")
        v.update(value)
        if v["status"] not in STATUS:
            raise FieldError("result.status", number, f"status {v['status']} not in {sorted(STATUS)}")
        return b"".join(
            _encode_value(f"result.{n}" if n else "result.reserved", number, s, k,
                          v[n] if n else None)
            for n, s, k, _ in RESULT_BLOCK)
    raise AssertionError(kind)


def _decode_value(name, number, raw: bytes, kind):
    if kind in _INT_FMT:
        return struct.unpack(_INT_FMT[kind], raw)[0]
    if kind == "reserved":
        if any(raw):
            raise FieldError(name, number, "reserved bytes must be zero")
        return None
    if kind in ("ascii", "digits", "utf8"):
        end = raw.find(b"\x00")
        if end >= 0:
            if any(raw[end:]):
                raise FieldError(name, number, "0x00 inside the value or non-zero byte in the padding")
            raw = raw[:end]
        if kind == "ascii":
            if not all(0x20 <= b <= 0x7E for b in raw):
                raise FieldError(name, number, "not printable ASCII")
            return raw.decode("ascii")
        if kind == "digits":
            if not all(0x30 <= b <= 0x39 for b in raw):
                raise FieldError(name, number, "not ASCII digits")
            return raw.decode("ascii")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FieldError(name, number, f"invalid UTF-8: {e.reason}") from None
    if kind == "result":
        out, pos = {}, 0
        for n, s, k, _ in RESULT_BLOCK:
            v = _decode_value(f"result.{n}" if n else "result.reserved", number, raw[pos:pos + s], k)
            if n:
                out[n] = v
            pos += s
        if out["status"] not in STATUS:
            raise FieldError("result.status", number, f"status {out['status']} not in {sorted(STATUS)}")
        return out
    raise AssertionError(kind)


# ---------------------------------------------------------------------------
# Frames


@dataclass
class Frame:
    name: str                       # e.g. "DEBIT_RSP"
    header: Dict[str, Any]          # magic, version, msg_type, length, flags, request_id, ...
    body: Dict[str, Any]            # field name -> value; "result" is a dict
    mac: bytes
    raw: bytes = dc_field(repr=False)
    mac_ok: Optional[bool] = None   # None when not verified
    advisory: bool = False          # unsigned REJECT (key_id 0, zero MAC), §4.4

    @property
    def msg_type(self) -> int:
        return self.header["msg_type"]

    @property
    def request_id(self) -> int:
        return self.header["request_id"]

    @property
    def merchant_no(self) -> str:
        return self.header["merchant_no"]

    @property
    def result(self) -> Optional[Dict[str, Any]]:
        return self.body.get("result")


def compute_mac(secret: bytes, signed_part: bytes) -> bytes:
    """HMAC-SHA256 over every byte of the frame before the trailer (§3.2)."""
    return hmac.new(secret, signed_part, hashlib.sha256).digest()


def verify_mac(frame: bytes, secret: bytes) -> bool:
    """Constant-time check of a whole frame's trailer."""
    if len(frame) < HEADER_LEN + MAC_LEN:
        return False
    return hmac.compare_digest(compute_mac(secret, frame[:-MAC_LEN]), frame[-MAC_LEN:])


def _check_header_rules(name: str, h: Dict[str, Any]) -> None:
    def bad(fname, problem):
        num = HEADER_FIELD_BASE + [f[0] for f in HEADER].index(fname)
        raise FieldError(f"header.{fname}", num, problem)

    if h["magic"] != MAGIC:
        bad("magic", f"must be {MAGIC!r}")
    if h["version"] != VERSION:
        bad("version", f"must be {VERSION}")
    if h["flags"] & ~FLAG_RESEND:
        bad("flags", "only bit 0 (RESEND) may be set")
    # An unsigned REJECT (§4.4) has key_id 0 and may lack a merchant number.
    if name != "REJECT":
        if h["key_id"] == 0:
            bad("key_id", "key ids are 1-65535")
        if h["merchant_no"] == "":
            bad("merchant_no", "must not be empty")


def encode_frame(message: str, header: Dict[str, Any], body: Dict[str, Any],
                 secret: bytes, *, validate: bool = True) -> bytes:
    """Build a complete frame: header | body | HMAC-SHA256(secret, header|body).

    ``header`` needs request_id, timestamp_ms, key_id and merchant_no; flags
    defaults to 0.  magic, version, msg_type and length are filled in (if given
    they must agree).  ``body`` maps field names to values; every field of the
    layout must be present (extra keys are an error).  With ``validate`` the
    §2 rules written in the layout table are checked too.
    """
    if message not in MESSAGES:
        raise FrameError(f"unknown message {message!r}")
    code, fields = MESSAGES[message]
    length = message_length(message)
    h = {"magic": MAGIC, "version": VERSION, "msg_type": code, "length": length, "flags": 0}
    for k in ("magic", "version", "msg_type", "length"):
        if k in header and header[k] != h[k]:
            raise FrameError(f"header {k}={header[k]!r} disagrees with {message} ({h[k]!r})")
    h.update(header)
    unknown = set(h) - {f[0] for f in HEADER}
    if unknown:
        raise FrameError(f"unknown header keys {sorted(unknown)}")

    out = bytearray()
    for number, (fname, size, kind, _) in enumerate(HEADER, HEADER_FIELD_BASE):
        if kind != "reserved" and fname not in h:
            raise FieldError(f"header.{fname}", number, "missing")
        out += _encode_value(f"header.{fname}", number, size, kind, h.get(fname))
    if validate:
        _check_header_rules(message, h)

    unknown = set(body) - {f[0] for f in fields}
    if unknown:
        raise FrameError(f"{message} has no field(s) {sorted(unknown)}")
    for number, (fname, size, kind, rule) in enumerate(fields, 1):
        if fname not in body:
            raise FieldError(fname, number, "missing")
        value = body[fname]
        out += _encode_value(fname, number, size, kind, value)
        if validate and rule is not None:
            p = _rule_problem(rule, value)
            if p:
                raise FieldError(fname, number, p)

    assert len(out) == length - MAC_LEN
    out += compute_mac(secret, bytes(out))
    return bytes(out)


def frame_length(buf: bytes) -> Optional[int]:
    """Length announced by a frame's header, or None if fewer than 6 bytes are
    available.  Raises FrameError when framing is lost (§9)."""
    if len(buf) < 6:
        return None
    if buf[0:2] != MAGIC.encode():
        raise FrameError("framing lost: magic is not 'SL'")
    n = struct.unpack(">H", buf[4:6])[0]
    if not MIN_FRAME_LEN <= n <= MAX_FRAME_LEN:
        raise FrameError(f"framing lost: length {n} outside {MIN_FRAME_LEN}..={MAX_FRAME_LEN}")
    return n


KeySource = Union[bytes, Callable[[str, int], Optional[bytes]], None]


def decode_frame(data: bytes, key: KeySource, *, verify: bool = True,
                 validate: bool = False) -> Frame:
    """Parse one whole frame and (with ``verify``) check its MAC.

    ``key`` is the secret (bytes) or a function (merchant_no, key_id) -> secret
    or None.  Encoding rules of §2 (padding, character sets, reserved bytes,
    result status) are always checked; with ``validate`` the field rules of the
    layout table too.  Raises FrameError, FieldError or MacError.  An unsigned
    REJECT (key_id 0 and a MAC of 32 zero bytes, §4.4) is returned with
    ``advisory=True`` instead of failing MAC verification.
    """
    data = bytes(data)
    n = frame_length(data)
    if n is None or len(data) < HEADER_LEN + MAC_LEN:
        raise FrameError(f"short frame: {len(data)} bytes")
    if len(data) != n:
        raise FrameError(f"length field says {n}, got {len(data)} bytes")

    header: Dict[str, Any] = {}
    pos = 0
    for number, (fname, size, kind, _) in enumerate(HEADER, HEADER_FIELD_BASE):
        v = _decode_value(f"header.{fname}", number, data[pos:pos + size], kind)
        if kind != "reserved":
            header[fname] = v
        pos += size
    if header["version"] != VERSION:
        raise FrameError(f"unsupported version {header['version']}")
    name = NAMES_BY_CODE.get(header["msg_type"])
    if name is None:
        raise FrameError(f"unknown message type 0x{header['msg_type']:02X}")
    if n != message_length(name):
        raise FrameError(f"{name} must be {message_length(name)} bytes, length field says {n}")
    _check_header_rules(name, header)

    body: Dict[str, Any] = {}
    for number, (fname, size, kind, rule) in enumerate(MESSAGES[name][1], 1):
        v = _decode_value(fname, number, data[pos:pos + size], kind)
        if validate and rule is not None:
            p = _rule_problem(rule, v)
            if p:
                raise FieldError(fname, number, p)
        body[fname] = v
        pos += size

    mac = data[-MAC_LEN:]
    frame = Frame(name=name, header=header, body=body, mac=mac, raw=data)
    if name == "REJECT" and header["key_id"] == 0 and mac == b"\x00" * MAC_LEN:
        frame.advisory = True
        frame.mac_ok = False
        return frame
    if verify:
        secret = key(header["merchant_no"], header["key_id"]) if callable(key) else key
        if secret is None:
            raise MacError(f"no key for merchant {header['merchant_no']!r} key id {header['key_id']}")
        frame.mac_ok = verify_mac(data, secret)
        if not frame.mac_ok:
            raise MacError(f"{name}: MAC does not verify")
    return frame


# ---------------------------------------------------------------------------
# Connection


class KeyRing:
    """Secrets per (merchant_no, key_id) and the key id each merchant signs with.

    Key rotation (§5): ``add`` the new key with ``use=True`` (requests are
    signed with it from then on), keep the old one until the switch drops it,
    then ``remove`` it.
    """

    def __init__(self) -> None:
        self._keys: Dict[Tuple[str, int], bytes] = {}
        self._active: Dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, merchant_no: str, key_id: int, secret: bytes, use: bool = True) -> None:
        if not 1 <= key_id <= 0xFFFF:
            raise ValueError("key id must be 1-65535")
        if not 32 <= len(secret) <= 64:
            raise ValueError("secret must be 32-64 bytes")
        with self._lock:
            self._keys[(merchant_no, key_id)] = bytes(secret)
            if use or merchant_no not in self._active:
                self._active[merchant_no] = key_id

    def remove(self, merchant_no: str, key_id: int) -> None:
        with self._lock:
            self._keys.pop((merchant_no, key_id), None)

    def signing(self, merchant_no: str) -> Tuple[int, bytes]:
        with self._lock:
            kid = self._active[merchant_no]
            return kid, self._keys[(merchant_no, kid)]

    def lookup(self, merchant_no: str, key_id: int) -> Optional[bytes]:
        with self._lock:
            return self._keys.get((merchant_no, key_id))


class RequestIds:
    """64-bit counter seeded with the current time in microseconds (§8); 0 is
    never used (the switch reports frames it could not read with request id 0)."""

    def __init__(self) -> None:
        self._counter = itertools.count(max(1, time.time_ns() // 1000))
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            rid = next(self._counter) & 0xFFFFFFFFFFFFFFFF
            return rid if rid else next(self._counter) & 0xFFFFFFFFFFFFFFFF


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Connection:
    """One blocking TCP connection to the switch's lender port.

    A reader thread receives frames: responses complete the waiting request
    (matched by request id), ECHO_REQ is answered with ECHO_RSP, NOTIFY is
    passed to ``on_notify(frame)`` and acknowledged with NOTIFY_ACK once that
    returns (if it raises, no ACK is sent and the switch repeats the NOTIFY).
    ``on_notify`` must store the result durably and be idempotent: delivery is
    at least once (§4.3).  A heartbeat thread sends ECHO_REQ after
    ``heartbeat_s`` seconds without sending.

        keys = KeyRing(); keys.add("898100000000001", 1, secret)
        with Connection.open("switch.example", 7001, keys, on_notify=store) as c:
            c.logon("898100000000001")
            rsp = c.request("DEBIT_REQ", {...}, "898100000000001")
    """

    def __init__(self, sock: socket.socket, keys: KeyRing, *,
                 on_notify: Optional[Callable[[Frame], None]] = None,
                 client_name: str = "sluice-py", heartbeat_s: int = 0,
                 timeout: float = 30.0) -> None:
        self._sock = sock
        self._keys = keys
        self._on_notify = on_notify
        self._client_name = client_name
        self._proposed_heartbeat = heartbeat_s
        self.timeout = timeout
        self._ids = RequestIds()
        self._send_lock = threading.Lock()
        self._pending: Dict[int, Tuple[str, str, Future]] = {}
        self._pending_lock = threading.Lock()
        self._inflight: Optional[threading.BoundedSemaphore] = None
        self.merchants: List[str] = []          # logged on
        self.limits: Dict[str, int] = {}        # from LOGON_RSP
        self._last_sent = time.monotonic()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read_loop, name="sluice-reader", daemon=True)
        self._reader.start()
        self._beat = threading.Thread(target=self._heartbeat_loop, name="sluice-heartbeat", daemon=True)
        self._beat.start()

    @classmethod
    def open(cls, host: str, port: int, keys: KeyRing, **kw) -> "Connection":
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, keys, **kw)

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- public API -------------------------------------------------------

    def logon(self, merchant_no: str) -> Frame:
        rsp = self.request("LOGON_REQ", {"heartbeat_s": self._proposed_heartbeat,
                                         "client_name": self._client_name}, merchant_no)
        if rsp.result["status"] == 0:
            if merchant_no not in self.merchants:
                self.merchants.append(merchant_no)
            self.limits = {k: rsp.body[k] for k in
                           ("heartbeat_s", "idle_timeout_s", "replay_window_s", "inflight_max")}
            if self._inflight is None and rsp.body["inflight_max"] > 0:
                self._inflight = threading.BoundedSemaphore(rsp.body["inflight_max"])
        return rsp

    def logoff(self, merchant_no: str) -> Frame:
        rsp = self.request("LOGOFF_REQ", {}, merchant_no)
        if merchant_no in self.merchants:
            self.merchants.remove(merchant_no)
        return rsp

    def echo(self, merchant_no: Optional[str] = None, nonce: Optional[int] = None) -> Frame:
        m = merchant_no or (self.merchants[0] if self.merchants else None)
        if m is None:
            raise SluiceError("echo needs a merchant number")
        return self.request("ECHO_REQ", {"nonce": nonce if nonce is not None else _now_ms()}, m)

    def request(self, message: str, body: Dict[str, Any], merchant_no: str, *,
                resend: bool = False, timeout: Optional[float] = None) -> Frame:
        """Send a request and wait for its response (any status); raises
        Rejected if the switch answers with REJECT.  Use a new call (new
        request id) with the same order id to retry an order (§8)."""
        return self.submit(message, body, merchant_no, resend=resend).result(
            timeout if timeout is not None else self.timeout)

    def submit(self, message: str, body: Dict[str, Any], merchant_no: str, *,
               resend: bool = False) -> Future:
        """Send a request without waiting; the Future yields the response Frame."""
        if message not in LENDER_REQUESTS:
            raise SluiceError(f"{message} is not a lender request")
        key_id, secret = self._keys.signing(merchant_no)
        rid = self._ids.next()
        frame = encode_frame(message, {
            "flags": FLAG_RESEND if resend else 0, "request_id": rid,
            "timestamp_ms": _now_ms(), "key_id": key_id, "merchant_no": merchant_no,
        }, body, secret)
        fut: Future = Future()
        if self._inflight is not None and not self._inflight.acquire(timeout=self.timeout):
            raise SluiceError("too many requests in flight")
        with self._pending_lock:
            self._pending[rid] = (response_name(message), merchant_no, fut)
        try:
            self._send(frame)
        except Exception:
            self._finish(rid)
            raise
        return fut

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        for _, _, fut in pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("connection closed"))

    # -- internals --------------------------------------------------------

    def _send(self, frame: bytes) -> None:
        with self._send_lock:
            self._sock.sendall(frame)
            self._last_sent = time.monotonic()

    def _finish(self, rid: int):
        with self._pending_lock:
            entry = self._pending.pop(rid, None)
        if entry is not None and self._inflight is not None:
            try:
                self._inflight.release()
            except ValueError:
                pass
        return entry

    def _reply(self, req: Frame, message: str, body: Dict[str, Any]) -> None:
        """Answer a switch request with the same request id, merchant and key id (§3.3)."""
        h = req.header
        secret = self._keys.lookup(h["merchant_no"], h["key_id"])
        self._send(encode_frame(message, {
            "request_id": h["request_id"], "timestamp_ms": _now_ms(),
            "key_id": h["key_id"], "merchant_no": h["merchant_no"]}, body, secret))

    def _recv_exact(self, n: int) -> Optional[bytes]:
        buf = bytearray()
        while len(buf) < n:
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def _read_loop(self) -> None:
        try:
            while not self._closed.is_set():
                head = self._recv_exact(HEADER_LEN)
                if head is None:
                    break
                n = frame_length(head)          # raises FrameError if framing is lost
                if n < HEADER_LEN + MAC_LEN:
                    raise FrameError(f"length {n} shorter than header and MAC")
                rest = self._recv_exact(n - HEADER_LEN)
                if rest is None:
                    break
                self._dispatch(head + rest)
        except (OSError, FrameError) as e:
            if not self._closed.is_set():
                log.error("connection lost: %s", e)
        finally:
            self.close()

    def _dispatch(self, data: bytes) -> None:
        try:
            frame = decode_frame(data, self._keys.lookup)
        except SluiceError as e:
            # The lender has no way to reject a frame (REJECT is S->L only): drop it.
            log.warning("dropping frame from switch: %s", e)
            return
        name = frame.name
        if name == "ECHO_REQ":
            self._reply(frame, "ECHO_RSP", {"nonce": frame.body["nonce"]})
        elif name == "NOTIFY":
            if self._on_notify is not None:
                try:
                    self._on_notify(frame)
                except Exception:
                    log.exception("on_notify failed; NOTIFY %d not acknowledged",
                                  frame.body["notify_id"])
                    return
            else:
                log.warning("NOTIFY %d acknowledged without a handler", frame.body["notify_id"])
            self._reply(frame, "NOTIFY_ACK", {"notify_id": frame.body["notify_id"]})
        elif name == "REJECT":
            entry = self._finish(frame.request_id)
            if entry is None:
                log.warning("REJECT for no pending request: %s", Rejected(frame))
            elif not entry[2].done():
                entry[2].set_exception(Rejected(frame))
        elif frame.msg_type & 0x80:
            entry = self._finish(frame.request_id)
            if entry is None:
                log.warning("%s for unknown request id %d", name, frame.request_id)
                return
            expected, merchant_no, fut = entry
            if name != expected or frame.merchant_no != merchant_no:
                fut.set_exception(SluiceError(
                    f"expected {expected} for {merchant_no}, got {name} for {frame.merchant_no}"))
            elif not fut.done():
                fut.set_result(frame)
        else:
            log.warning("unexpected %s from switch, ignored", name)

    def _heartbeat_loop(self) -> None:
        while not self._closed.wait(1.0):
            hb = self.limits.get("heartbeat_s") or 0
            if hb and self.merchants and time.monotonic() - self._last_sent >= hb:
                try:
                    self.submit("ECHO_REQ", {"nonce": _now_ms()}, self.merchants[0])
                except (SluiceError, OSError) as e:
                    log.warning("heartbeat failed: %s", e)
