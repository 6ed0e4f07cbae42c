#!/usr/bin/env python3
"""Drive a running `sluice demo` through every lender message type.

Standard library only. Exits 0 when every step got the answer the spec promises,
non-zero (with the step that failed) otherwise. CI runs it against `sluice demo`, so the
spec, this client and the switch cannot drift apart.

    python3 protocol/clients/python/demo.py --port 7400 --key-file sluice-demo/merchant.keys
"""
import argparse
import os
import queue
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sluice_client as sc  # noqa: E402

SUCCESS, FAILED, PENDING, REJECTED = 0, 1, 2, 3
ALREADY_SIGNED, DUPLICATE_ORDER, UNKNOWN_ORDER, AGREEMENT_REVOKED = 209, 205, 211, 202


def luhn_card(prefix: str) -> str:
    for d in "0123456789":
        if sc.luhn_ok(prefix + d):
            return prefix + d
    raise AssertionError("no check digit")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7400)
    ap.add_argument("--key-file", required=True)
    args = ap.parse_args()

    keys = sc.KeyRing()
    merchant = None
    with open(args.key_file) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and not line.startswith("#"):
                merchant = parts[0]
                keys.add(parts[0], int(parts[1]), bytes.fromhex(parts[2]))
    assert merchant, "no key in the key file"

    notes: "queue.Queue" = queue.Queue()
    run = str(int(time.time() * 1000))  # order ids unique per run
    step = {"n": 0}

    def check(what: str, cond: bool, frame=None) -> None:
        step["n"] += 1
        if not cond:
            print(f"FAIL step {step['n']}: {what}: {frame.name if frame else ''} "
                  f"{frame.result if frame else ''} {frame.body if frame else ''}")
            sys.exit(1)
        print(f"ok   {what}")

    with sc.Connection.open(args.host, args.port, keys, on_notify=notes.put) as c:
        r = c.logon(merchant)
        check("LOGON", r.result["status"] == SUCCESS, r)
        r = c.echo(merchant, 42)
        check("ECHO", r.name == "ECHO_RSP" and r.body["nonce"] == 42, r)

        card = luhn_card("62220299" + run[-10:])
        phone = "139" + run[-8:]
        elements = {"user_id": "U" + run, "card_type": 1, "bank_code": "ICBC",
                    "card_no": card, "id_no": "11010519491231002X", "name": "王小明",
                    "phone": phone, "mode": 0}
        r = c.request("PREBIND_REQ", elements, merchant)
        check("PREBIND (SMS sent)", r.result["status"] == SUCCESS and r.body["bind_ref"] != 0, r)
        r = c.request("BIND_CONFIRM_REQ", {"bind_ref": r.body["bind_ref"],
                                           "sms_code": phone[-6:]}, merchant)
        check("BIND_CONFIRM -> agreement id", r.result["status"] == SUCCESS
              and r.body["agreement_id"] != 0, r)
        agreement = r.body["agreement_id"]
        r = c.request("PREBIND_REQ", elements, merchant)
        check("PREBIND again -> ALREADY_SIGNED", r.result["reason"] == ALREADY_SIGNED
              and r.body["agreement_id"] == agreement, r)
        r = c.request("AGREEMENT_QUERY_REQ", {"agreement_id": agreement}, merchant)
        check("AGREEMENT_QUERY", r.result["status"] == SUCCESS and r.body["state"] == 1
              and r.body["card_last4"] == card[-4:], r)

        debit = {"order_id": "D" + run, "agreement_id": agreement, "amount": 12345,
                 "currency": "CNY", "purpose": "贷款还款 第1期"}
        r = c.request("DEBIT_REQ", debit, merchant)
        check("DEBIT", r.result["status"] in (SUCCESS, PENDING), r)
        n = notes.get(timeout=20)
        check("NOTIFY for the debit (acknowledged)", n.body["order_id"] == "D" + run
              and n.body["result"]["status"] == SUCCESS, n)
        r = c.request("DEBIT_REQ", debit, merchant)
        check("DEBIT repeated -> DUPLICATE_ORDER", r.result["reason"] == DUPLICATE_ORDER
              and r.result["status"] == SUCCESS, r)
        r = c.request("ORDER_QUERY_REQ", {"order_id": "D" + run}, merchant)
        check("ORDER_QUERY", r.result["status"] == SUCCESS and r.body["amount"] == 12345, r)
        r = c.request("ORDER_QUERY_REQ", {"order_id": "nope" + run}, merchant)
        check("ORDER_QUERY unknown -> UNKNOWN_ORDER", r.result["reason"] == UNKNOWN_ORDER, r)

        r = c.request("PAYOUT_REQ", {"order_id": "P" + run, "amount": 500000, "currency": "CNY",
                                     "card_type": 1, "bank_code": "ICBC", "card_no": card,
                                     "name": "王小明", "purpose": "借款发放"}, merchant)
        check("PAYOUT", r.result["status"] in (SUCCESS, PENDING), r)
        n = notes.get(timeout=20)
        check("NOTIFY for the payout", n.body["order_id"] == "P" + run, n)

        card2 = luhn_card("62220298" + run[-10:])
        phone2 = "137" + run[-8:]
        r = c.request("SIGN_AND_PAY_REQ", dict({k: v for k, v in elements.items() if k != "mode"}, card_no=card2, phone=phone2,
                                               order_id="S" + run, amount=100,
                                               currency="CNY", purpose="首期"), merchant)
        check("SIGN_AND_PAY -> PENDING, SMS sent", r.result["status"] == PENDING
              and r.body["bind_ref"] != 0, r)
        r = c.request("BIND_CONFIRM_REQ", {"bind_ref": r.body["bind_ref"],
                                           "sms_code": phone2[-6:]}, merchant)
        check("BIND_CONFIRM of sign-and-pay", r.result["status"] == SUCCESS, r)
        n = notes.get(timeout=20)
        check("NOTIFY for the sign-and-pay debit", n.body["order_id"] == "S" + run
              and n.body["result"]["status"] == SUCCESS, n)

        r = c.request("AGREEMENT_CANCEL_REQ", {"agreement_id": agreement}, merchant)
        check("AGREEMENT_CANCEL", r.result["status"] == SUCCESS, r)
        r = c.request("DEBIT_REQ", dict(debit, order_id="X" + run), merchant)
        check("DEBIT on a cancelled agreement -> AGREEMENT_REVOKED",
              r.result["reason"] == AGREEMENT_REVOKED, r)
        r = c.logoff(merchant)
        check("LOGOFF", r.result["status"] == SUCCESS, r)
    print(f"{step['n']} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
