//! The link between sluice and an upstream payment channel (`protocol/CHANNEL.md`).
