//! The synthetic borrowers, the same in `prepare`, the simulators and the generator: card
//! `n` has a Luhn-valid card number, an ID number and a bank-reserved phone derived from
//! `n`, so no file has to be read to sign, debit or pay out.

use sluice::message as lm;

/// Bank code of every synthetic card.
pub const BANK: &str = "ICBC";

/// A Luhn-valid 19-digit card number for card `n` (n < 10^12).
pub fn card_no(n: u64) -> String {
    let base = format!("622202{:012}", n % 1_000_000_000_000);
    (0..10)
        .map(|d| format!("{base}{d}"))
        .find(|c| lm::luhn_ok(c.as_bytes()))
        .expect("one check digit fits")
}

/// An ID number for card `n`: 17 digits and `X`.
pub fn id_no(n: u64) -> String {
    format!("110105{:011}X", n % 100_000_000_000)
}

/// The bank-reserved phone of card `n`; its last six digits are the simulators'
/// deterministic SMS code.
pub fn phone(n: u64) -> String {
    format!("13{:09}", n % 1_000_000_000)
}

/// Merchant number `m` (0-based).
pub fn merchant_no(m: usize) -> String {
    format!("8981{:011}", m + 1)
}

/// The channel agreement number of card `n` on `channel` (as preloaded in the simulator).
pub fn agreement_no(channel: &str, n: u64) -> String {
    format!("P{channel}{n:012}")
}

/// PREBIND_REQ for card `n`.
pub fn prebind(n: u64) -> lm::PreBindReq {
    lm::PreBindReq {
        user_id: lm::UserId::new(&format!("U{n}")).expect("user id"),
        card_type: lm::CardType::Debit,
        bank_code: lm::BankCode::new(BANK).expect("bank"),
        card_no: lm::CardNo::new(&card_no(n)).expect("card"),
        id_no: lm::IdNo::new(&id_no(n)).expect("id"),
        name: lm::Name::new("张三").expect("name"),
        phone: lm::Phone::new(&phone(n)).expect("phone"),
        mode: lm::BindMode::Sign,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_fields_are_valid_and_distinct() {
        for n in [0, 1, 99_999, 500_000_123_456, 999_999_999_999] {
            let p = prebind(n);
            assert_eq!(p.card_no.expose(), card_no(n));
        }
        assert_ne!(card_no(1), card_no(2));
        assert_eq!(phone(1_234_567).len(), 11);
        assert!(phone(1_234_567).ends_with("234567"));
        assert_eq!(merchant_no(0), "898100000000001");
        assert!(sluice::wire::header::MerchantNo::new(&merchant_no(999)).is_ok());
    }
}
