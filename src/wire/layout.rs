//! The message-layout macro shared by the lender protocol and the channel link.
//!
//! One invocation per protocol declares every message type once: the body structs, their
//! encoders and decoders (with the 1-based field number of a malformed field), the fixed
//! frame lengths, the `Message` enum, and the layout tables the protocol specs print.
//! The invoking module must have in scope: `BytesMut`, `Field`, `FieldProblem`,
//! `FieldSpec`, `Malformed`, `HEADER_LEN`, `MAC_LEN`.

use super::field::FieldProblem;

/// One row of a message layout table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldSpec {
    /// Field name as in the spec.
    pub name: &'static str,
    /// Type description.
    pub kind: &'static str,
    /// Width in bytes.
    pub size: usize,
}

/// A body field failed to decode or validate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("field {field} ({name}): {problem}")]
pub struct Malformed {
    /// 1-based field number in the body layout.
    pub field: u16,
    /// Field name.
    pub name: &'static str,
    /// What is wrong.
    pub problem: FieldProblem,
}

macro_rules! messages {
    ($(
        $(#[$m:meta])*
        $name:ident = $code:literal, $wire:literal {
            $( $(#[$fm:meta])* $f:ident : $t:ty ),* $(,)?
        }
    )*) => {
        $(
            $(#[$m])*
            #[derive(Debug, Clone, PartialEq, Eq)]
            pub struct $name {
                $( $(#[$fm])* pub $f: $t, )*
            }

            impl $name {
                /// Message type code.
                pub const CODE: u8 = $code;
                /// Wire name in the spec.
                pub const WIRE_NAME: &'static str = $wire;
                /// Body length in bytes.
                pub const BODY_LEN: usize = 0 $( + <$t as Field>::SIZE )*;
                /// Total frame length in bytes.
                pub const FRAME_LEN: usize = HEADER_LEN + Self::BODY_LEN + MAC_LEN;
                /// Body layout, in wire order.
                pub const LAYOUT: &'static [FieldSpec] = &[
                    $( FieldSpec { name: stringify!($f), kind: <$t as Field>::KIND, size: <$t as Field>::SIZE }, )*
                ];

                #[allow(unused_variables)]
                fn put_body(&self, out: &mut BytesMut) {
                    $( self.$f.put(out); )*
                }

                #[allow(unused_mut, unused_variables, unused_assignments)]
                fn get_body(src: &[u8]) -> Result<Self, Malformed> {
                    debug_assert_eq!(src.len(), Self::BODY_LEN);
                    let mut off = 0usize;
                    let mut field = 0u16;
                    $(
                        field += 1;
                        let end = off + <$t as Field>::SIZE;
                        let $f = <$t as Field>::get(&src[off..end]).map_err(|problem| Malformed {
                            field,
                            name: stringify!($f),
                            problem,
                        })?;
                        off = end;
                    )*
                    Ok($name { $( $f ),* })
                }
            }

            impl From<$name> for Message {
                fn from(m: $name) -> Message {
                    Message::$name(m)
                }
            }
        )*

        /// Every lender message.
        #[derive(Debug, Clone, PartialEq, Eq)]
        #[allow(clippy::large_enum_variant)]
        pub enum Message {
            $( $(#[$m])* $name($name), )*
        }

        impl Message {
            /// Message type code.
            pub fn code(&self) -> u8 {
                match self { $( Message::$name(_) => $code, )* }
            }

            /// Wire name in the spec.
            pub fn wire_name(&self) -> &'static str {
                match self { $( Message::$name(_) => $wire, )* }
            }

            fn put_body(&self, out: &mut BytesMut) {
                match self { $( Message::$name(m) => m.put_body(out), )* }
            }

            /// Decode a body of message type `code` (length already checked by the codec).
            pub fn decode_body(code: u8, body: &[u8]) -> Result<Message, Malformed> {
                match code {
                    $( $code => $name::get_body(body).map(Message::$name), )*
                    _ => Err(Malformed { field: 0, name: "msg_type", problem: FieldProblem::OutOfRange }),
                }
            }
        }

        /// The fixed total frame length of a message type.
        pub fn frame_len(code: u8) -> Option<usize> {
            match code {
                $( $code => Some($name::FRAME_LEN), )*
                _ => None,
            }
        }

        /// (code, wire name, frame length, body layout) of every message type, in
        /// declaration order; the spec's tables are generated from this.
        pub const CATALOGUE: &[(u8, &str, usize, &[FieldSpec])] = &[
            $( ($code, $wire, $name::FRAME_LEN, $name::LAYOUT), )*
        ];
    };
}
pub(crate) use messages;
