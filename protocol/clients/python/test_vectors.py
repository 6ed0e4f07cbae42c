"""Golden-vector and validation tests for sluice_client.

Run from the repository root:
    python3 -m unittest discover -s protocol/clients/python -v
"""

import glob
import json
import os
import re
import socket
import sys
import threading
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sluice_client as sc  # noqa: E402

VECTOR_DIR = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "vectors", "lender"))
VECTOR_FILES = sorted(glob.glob(os.path.join(VECTOR_DIR, "*.json")))


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def vector_inputs(v):
    header = dict(v["header"])
    body = {f["name"]: f["value"] for f in v["body"]}
    secret = bytes.fromhex(v["key"]["secret_hex"])
    return header, body, secret


def resign(frame: bytes, secret: bytes) -> bytes:
    return frame[:-32] + sc.compute_mac(secret, frame[:-32])


# ---------------------------------------------------------------------------
# Golden vectors: one group of tests per file, generated below.


class GoldenVectors(unittest.TestCase):

    def test_vectors_present(self):
        self.assertTrue(VECTOR_FILES, f"no vectors found in {VECTOR_DIR}")

    def test_every_message_type_has_exactly_one_vector(self):
        seen = [load(p)["message"] for p in VECTOR_FILES]
        self.assertEqual(sorted(seen), sorted(set(seen)), "duplicate vectors")
        self.assertEqual(set(seen), set(sc.MESSAGES))

    def test_response_codes_have_bit7(self):
        for name, code in sc.TYPE_CODES.items():
            if name.endswith("_REQ") or name == "NOTIFY":
                self.assertEqual(sc.TYPE_CODES[sc.response_name(name)], code | 0x80)


def _make_tests(path):
    v = load(path)
    stem = os.path.splitext(os.path.basename(path))[0]

    def test_encode(self):
        header, body, secret = vector_inputs(v)
        frame = sc.encode_frame(v["message"], header, body, secret)
        self.assertEqual(frame.hex(), v["frame_hex"])
        self.assertEqual(frame[-32:].hex(), v["mac_hex"])

    def test_decode(self):
        _, _, secret = vector_inputs(v)
        frame = sc.decode_frame(bytes.fromhex(v["frame_hex"]), secret, validate=True)
        self.assertEqual(frame.name, v["message"])
        self.assertTrue(frame.mac_ok)
        self.assertFalse(frame.advisory)
        self.assertEqual(frame.mac.hex(), v["mac_hex"])
        for k, want in v["header"].items():
            self.assertEqual(frame.header[k], want, f"header.{k}")
        self.assertEqual(set(frame.body), {f["name"] for f in v["body"]})
        for f in v["body"]:
            self.assertEqual(frame.body[f["name"]], f["value"], f["name"])

    def test_decode_with_key_lookup(self):
        _, _, secret = vector_inputs(v)
        keys = {(v["key"]["merchant_no"], v["key"]["key_id"]): secret}
        frame = sc.decode_frame(bytes.fromhex(v["frame_hex"]),
                                lambda m, k: keys.get((m, k)))
        self.assertTrue(frame.mac_ok)
        self.assertEqual(v["key"]["merchant_no"], v["header"]["merchant_no"])
        self.assertEqual(v["key"]["key_id"], v["header"]["key_id"])

    def test_layout_matches_vector(self):
        code, fields = sc.MESSAGES[v["message"]]
        self.assertEqual(code, v["type"])
        self.assertEqual(sc.message_length(v["message"]), v["length"])
        self.assertEqual(len(bytes.fromhex(v["frame_hex"])), v["length"])
        offset = sc.HEADER_LEN
        self.assertEqual(len(fields), len(v["body"]))
        for number, ((name, size, _, _), vf) in enumerate(zip(fields, v["body"]), 1):
            self.assertEqual((number, name, offset, size),
                             (vf["field"], vf["name"], vf["offset"], vf["size"]))
            offset += size
        m = re.match(r"bytes 0\.\.(\d+)", v["mac_covers"])
        self.assertIsNotNone(m)
        self.assertEqual(int(m.group(1)), offset)
        self.assertEqual(int(m.group(1)), v["length"] - 32)

    def test_mac_verifies(self):
        _, _, secret = vector_inputs(v)
        frame = bytes.fromhex(v["frame_hex"])
        self.assertTrue(sc.verify_mac(frame, secret))
        self.assertFalse(sc.verify_mac(frame, bytes(32)))
        with self.assertRaises(sc.MacError):
            sc.decode_frame(frame, bytes(32))

    def test_tampering_any_byte_fails(self):
        _, _, secret = vector_inputs(v)
        frame = bytes.fromhex(v["frame_hex"])
        for i in range(len(frame)):
            bad = bytearray(frame)
            bad[i] ^= 0x01
            bad = bytes(bad)
            self.assertFalse(sc.verify_mac(bad, secret), f"byte {i}")
            with self.assertRaises(sc.SluiceError, msg=f"byte {i}"):
                sc.decode_frame(bad, secret)

    for fn in (test_encode, test_decode, test_decode_with_key_lookup,
               test_layout_matches_vector, test_mac_verifies, test_tampering_any_byte_fails):
        setattr(GoldenVectors, f"{fn.__name__}__{stem}", fn)


for _p in VECTOR_FILES:
    _make_tests(_p)


# ---------------------------------------------------------------------------
# Field validation (§2)

KEY = bytes(range(32))
HDR = {"request_id": 0x0102030405060708, "timestamp_ms": 1795399200000,
       "key_id": 1, "merchant_no": "898100000000001"}

PREBIND = {"user_id": "U000123", "card_type": 1, "bank_code": "ICBC",
           "card_no": "6222021234567890128", "id_no": "11010519491231002X",
           "name": "张三", "phone": "13812345678", "mode": 0}
DEBIT = {"order_id": "ORD20261123000001", "agreement_id": 100000001,
         "amount": 150000, "currency": "CNY", "purpose": "贷款还款 第3期"}
PAYOUT = {"order_id": "PAY1", "amount": 5000000, "currency": "CNY", "card_type": 1,
          "bank_code": "ICBC", "card_no": "6222021234567890128", "name": "张三",
          "purpose": ""}


class Validation(unittest.TestCase):

    def assertFieldError(self, message, body, field, number, header=None):
        with self.assertRaises(sc.FieldError) as cm:
            sc.encode_frame(message, header or HDR, body, KEY)
        self.assertEqual(cm.exception.field, field)
        self.assertEqual(cm.exception.number, number)
        self.assertIn(field, str(cm.exception))
        return cm.exception

    def test_luhn(self):
        self.assertTrue(sc.luhn_ok("6222021234567890128"))
        self.assertTrue(sc.luhn_ok("4111111111111111"))
        self.assertFalse(sc.luhn_ok("4111111111111112"))

    def test_bad_luhn_rejected(self):
        e = self.assertFieldError("PREBIND_REQ", {**PREBIND, "card_no": "6222021234567890127"},
                                  "card_no", 4)
        self.assertIn("Luhn", str(e))
        self.assertFieldError("PAYOUT_REQ", {**PAYOUT, "card_no": "4111111111111112"}, "card_no", 6)

    def test_card_no_shape(self):
        self.assertFieldError("PREBIND_REQ", {**PREBIND, "card_no": "42424242424"}, "card_no", 4)  # 11 digits
        self.assertFieldError("PREBIND_REQ", {**PREBIND, "card_no": "4111 1111 1111 1111"}, "card_no", 4)
        self.assertFieldError("PREBIND_REQ", {**PREBIND, "card_no": "41111111111111111111"}, "card_no", 4)  # 20
        # a short valid card is zero-padded
        f = sc.encode_frame("PREBIND_REQ", HDR, {**PREBIND, "card_no": "4111111111111111"}, KEY)
        self.assertEqual(f[89:108], b"4111111111111111\0\0\0")
        self.assertEqual(sc.decode_frame(f, KEY).body["card_no"], "4111111111111111")

    def test_bad_id_no_rejected(self):
        for bad in ("11010519491231002Y", "11010519491231002x", "1101051949123100X",
                    "110105194912310021X", "1101051949123100XX", ""):
            self.assertFieldError("PREBIND_REQ", {**PREBIND, "id_no": bad}, "id_no", 5)
        sc.encode_frame("PREBIND_REQ", HDR, {**PREBIND, "id_no": "110105194912310021"}, KEY)

    def test_bad_phone_rejected(self):
        for bad in ("23812345678", "1381234567", "138123456789", "1381234567a"):
            self.assertFieldError("PREBIND_REQ", {**PREBIND, "phone": bad}, "phone", 7)

    def test_zero_amount_rejected(self):
        e = self.assertFieldError("DEBIT_REQ", {**DEBIT, "amount": 0}, "amount", 3)
        self.assertIn("greater than 0", str(e))
        self.assertFieldError("PAYOUT_REQ", {**PAYOUT, "amount": 0}, "amount", 2)
        sap = {**PREBIND, **DEBIT, "amount": 0}
        del sap["agreement_id"], sap["mode"]
        self.assertFieldError("SIGN_AND_PAY_REQ", sap, "amount", 9)

    def test_amount_type_and_range(self):
        self.assertFieldError("DEBIT_REQ", {**DEBIT, "amount": 1500.00}, "amount", 3)
        self.assertFieldError("DEBIT_REQ", {**DEBIT, "amount": -1}, "amount", 3)
        self.assertFieldError("DEBIT_REQ", {**DEBIT, "amount": 1 << 64}, "amount", 3)

    def test_currency_must_be_cny(self):
        self.assertFieldError("DEBIT_REQ", {**DEBIT, "currency": "USD"}, "currency", 4)
        self.assertFieldError("DEBIT_REQ", {**DEBIT, "currency": "cny"}, "currency", 4)

    def test_nonzero_ids_in_requests(self):
        self.assertFieldError("DEBIT_REQ", {**DEBIT, "agreement_id": 0}, "agreement_id", 2)
        self.assertFieldError("AGREEMENT_QUERY_REQ", {"agreement_id": 0}, "agreement_id", 1)
        self.assertFieldError("AGREEMENT_CANCEL_REQ", {"agreement_id": 0}, "agreement_id", 1)
        self.assertFieldError("BIND_CONFIRM_REQ", {"bind_ref": 0, "sms_code": "1234"}, "bind_ref", 1)

    def test_sms_code(self):
        for bad in ("123", "12a4", ""):
            self.assertFieldError("BIND_CONFIRM_REQ", {"bind_ref": 1, "sms_code": bad}, "sms_code", 2)
        self.assertFieldError("BIND_CONFIRM_REQ", {"bind_ref": 1, "sms_code": "123456789"}, "sms_code", 2)
        for ok in ("1234", "12345678"):
            sc.encode_frame("BIND_CONFIRM_REQ", HDR, {"bind_ref": 1, "sms_code": ok}, KEY)

    def test_card_type(self):
        self.assertFieldError("PREBIND_REQ", {**PREBIND, "card_type": 0}, "card_type", 2)
        self.assertFieldError("PREBIND_REQ", {**PREBIND, "card_type": 3}, "card_type", 2)

    def test_name_and_order_id(self):
        self.assertFieldError("PREBIND_REQ", {**PREBIND, "name": ""}, "name", 6)
        self.assertFieldError("DEBIT_REQ", {**DEBIT, "order_id": ""}, "order_id", 1)
        self.assertFieldError("DEBIT_REQ", {**DEBIT, "order_id": "订单1"}, "order_id", 1)
        self.assertFieldError("DEBIT_REQ", {**DEBIT, "order_id": "x" * 33}, "order_id", 1)
        sc.encode_frame("DEBIT_REQ", HDR, {**DEBIT, "order_id": "x" * 32}, KEY)

    def test_utf8_width(self):
        # §2: "a 64-byte name holds 21 characters"
        sc.encode_frame("PREBIND_REQ", HDR, {**PREBIND, "name": "张" * 21}, KEY)
        self.assertFieldError("PREBIND_REQ", {**PREBIND, "name": "张" * 22}, "name", 6)
        self.assertFieldError("PREBIND_REQ", {**PREBIND, "name": "张\x00三"}, "name", 6)

    def test_header_rules(self):
        self.assertFieldError("DEBIT_REQ", DEBIT, "header.merchant_no", 110, {**HDR, "merchant_no": ""})
        self.assertFieldError("DEBIT_REQ", DEBIT, "header.key_id", 108, {**HDR, "key_id": 0})
        self.assertFieldError("DEBIT_REQ", DEBIT, "header.flags", 105, {**HDR, "flags": 2})
        self.assertFieldError("DEBIT_REQ", DEBIT, "header.merchant_no", 110, {**HDR, "merchant_no": "8" * 17})
        f = sc.encode_frame("DEBIT_REQ", {**HDR, "flags": sc.FLAG_RESEND}, DEBIT, KEY)
        self.assertEqual(sc.decode_frame(f, KEY).header["flags"], 1)

    def test_missing_and_unknown_fields(self):
        body = dict(DEBIT)
        del body["purpose"]
        self.assertFieldError("DEBIT_REQ", body, "purpose", 5)
        with self.assertRaises(sc.FrameError):
            sc.encode_frame("DEBIT_REQ", HDR, {**DEBIT, "amout": 1}, KEY)
        with self.assertRaises(sc.FrameError):
            sc.encode_frame("DEBIT_REQ", {**HDR, "length": 100}, DEBIT, KEY)

    def test_validate_false_allows_malformed_values(self):
        f = sc.encode_frame("DEBIT_REQ", HDR, {**DEBIT, "amount": 0}, KEY, validate=False)
        self.assertEqual(sc.decode_frame(f, KEY).body["amount"], 0)
        with self.assertRaises(sc.FieldError) as cm:
            sc.decode_frame(f, KEY, validate=True)
        self.assertEqual(cm.exception.number, 3)

    def test_validate_field(self):
        sc.validate_field("PREBIND_REQ", "card_no", "6222021234567890128")
        with self.assertRaises(sc.FieldError):
            sc.validate_field("PREBIND_REQ", "card_no", "6222021234567890127")


# ---------------------------------------------------------------------------
# Decoder strictness (§2 padding rule, §3, §9)


class Decoding(unittest.TestCase):

    def setUp(self):
        self.debit = sc.encode_frame("DEBIT_REQ", HDR, DEBIT, KEY)

    def patched(self, offset, data, frame=None):
        b = bytearray(frame or self.debit)
        b[offset:offset + len(data)] = data
        return resign(bytes(b), KEY)

    def assertFieldErr(self, frame, number):
        with self.assertRaises(sc.FieldError) as cm:
            sc.decode_frame(frame, KEY)
        self.assertEqual(cm.exception.number, number)

    def test_nul_inside_value(self):
        self.assertFieldErr(self.patched(48 + 3, b"\x00"), 1)        # order_id "ORD\0..."

    def test_nonzero_padding(self):
        self.assertFieldErr(self.patched(48 + 31, b"Z"), 1)          # last byte of order_id

    def test_non_ascii_in_ascii_field(self):
        self.assertFieldErr(self.patched(48, b"\x7f"), 1)

    def test_invalid_utf8(self):
        self.assertFieldErr(self.patched(99, b"\xff"), 5)

    def test_reserved_header_bytes(self):
        self.assertFieldErr(self.patched(26, b"\x01"), 109)

    def test_flags(self):
        self.assertFieldErr(self.patched(6, b"\x00\x02"), 105)

    def test_result_block_reserved_and_status(self):
        v = load(os.path.join(VECTOR_DIR, "debit_rsp.json"))
        frame = bytes.fromhex(v["frame_hex"])
        self.assertFieldErr(self.patched(49, b"\x01", frame), 1)
        self.assertFieldErr(self.patched(54, b"\x01", frame), 1)
        self.assertFieldErr(self.patched(48, b"\x05", frame), 1)

    def test_framing(self):
        with self.assertRaises(sc.FrameError):
            sc.decode_frame(self.patched(0, b"XL"), KEY)                 # magic
        with self.assertRaises(sc.FrameError):
            sc.decode_frame(self.patched(2, b"\x02"), KEY)               # version
        with self.assertRaises(sc.FrameError):
            sc.decode_frame(self.patched(3, b"\x55"), KEY)               # unknown type
        with self.assertRaises(sc.FrameError):
            sc.decode_frame(self.patched(3, b"\x21"), KEY)               # length of another type
        with self.assertRaises(sc.FrameError):
            sc.decode_frame(self.debit[:-1], KEY)                        # truncated
        with self.assertRaises(sc.FrameError):
            sc.decode_frame(self.patched(4, b"\x04\x01"), KEY)           # 1025 > max
        self.assertEqual(sc.frame_length(self.debit[:6]), len(self.debit))
        self.assertIsNone(sc.frame_length(self.debit[:5]))

    def test_unknown_key(self):
        with self.assertRaises(sc.MacError):
            sc.decode_frame(self.debit, lambda m, k: None)

    def test_unsigned_reject_is_advisory(self):
        body = {"result": {"status": 3, "reason": 111}, "rejected_type": 0, "detail": "framing lost"}
        hdr = {"request_id": 0, "timestamp_ms": 1, "key_id": 0, "merchant_no": ""}
        f = sc.encode_frame("REJECT", hdr, body, KEY)
        f = f[:-32] + bytes(32)
        frame = sc.decode_frame(f, lambda m, k: None)
        self.assertTrue(frame.advisory)
        self.assertFalse(frame.mac_ok)
        self.assertEqual(frame.result["reason"], 111)


# ---------------------------------------------------------------------------
# Connection against a scripted fake switch on a socketpair


class FakeSwitch:
    def __init__(self, sock):
        self.sock = sock

    def recv(self):
        head = b""
        while len(head) < 48:
            head += self.sock.recv(48 - len(head))
        n = sc.frame_length(head)
        rest = b""
        while len(rest) < n - 48:
            rest += self.sock.recv(n - 48 - len(rest))
        return sc.decode_frame(head + rest, KEY, validate=True)

    def send(self, message, body, request_id):
        self.sock.sendall(sc.encode_frame(message, {**HDR, "request_id": request_id}, body, KEY))


class ConnectionTests(unittest.TestCase):

    def setUp(self):
        a, b = socket.socketpair()
        self.switch = FakeSwitch(b)
        self.notified = []
        keys = sc.KeyRing()
        keys.add(HDR["merchant_no"], 1, KEY)
        self.conn = sc.Connection(a, keys, on_notify=self.notified.append, timeout=5)
        self.addCleanup(self.conn.close)
        self.addCleanup(b.close)

    def logon(self):
        t = threading.Thread(target=lambda: self._answer_logon())
        t.start()
        rsp = self.conn.logon(HDR["merchant_no"])
        t.join()
        return rsp

    def _answer_logon(self):
        req = self.switch.recv()
        self.assertEqual(req.name, "LOGON_REQ")
        self.switch.send("LOGON_RSP", {"result": {}, "session_id": 42, "heartbeat_s": 30,
                                       "idle_timeout_s": 90, "replay_window_s": 120,
                                       "inflight_max": 8}, req.request_id)

    def test_logon(self):
        rsp = self.logon()
        self.assertEqual(rsp.body["session_id"], 42)
        self.assertEqual(self.conn.merchants, [HDR["merchant_no"]])
        self.assertEqual(self.conn.limits["inflight_max"], 8)

    def test_out_of_order_responses_echo_and_notify(self):
        self.logon()
        f1 = self.conn.submit("DEBIT_REQ", {**DEBIT, "order_id": "A"}, HDR["merchant_no"])
        f2 = self.conn.submit("DEBIT_REQ", {**DEBIT, "order_id": "B"}, HDR["merchant_no"])
        r1, r2 = self.switch.recv(), self.switch.recv()
        self.assertNotEqual(r1.request_id, r2.request_id)

        self.switch.send("ECHO_REQ", {"nonce": 99}, 555)
        echo = self.switch.recv()
        self.assertEqual((echo.name, echo.request_id, echo.body["nonce"]), ("ECHO_RSP", 555, 99))

        notify = {"notify_id": 77, "kind": 1, "result": {}, "order_id": "A", "order_type": 1,
                  "amount": 150000, "agreement_id": 100000001, "channel": "CHA",
                  "finished_at_ms": 1}
        self.switch.send("NOTIFY", notify, 556)
        ack = self.switch.recv()
        self.assertEqual((ack.name, ack.request_id, ack.body["notify_id"]), ("NOTIFY_ACK", 556, 77))
        self.assertEqual(self.notified[0].body["notify_id"], 77)

        for r in (r2, r1):   # answer in reverse order
            self.switch.send("DEBIT_RSP", {"result": {"status": 2}, "order_id": r.body["order_id"],
                                           "channel": "CHA"}, r.request_id)
        self.assertEqual(f1.result(5).body["order_id"], "A")
        self.assertEqual(f2.result(5).body["order_id"], "B")

    def test_reject_raises(self):
        self.logon()
        fut = self.conn.submit("ORDER_QUERY_REQ", {"order_id": "A"}, HDR["merchant_no"])
        req = self.switch.recv()
        self.switch.send("REJECT", {"result": {"status": 3, "reason": 105}, "rejected_type": 0x22,
                                    "detail": "stale"}, req.request_id)
        with self.assertRaises(sc.Rejected):
            fut.result(5)


if __name__ == "__main__":
    unittest.main()
