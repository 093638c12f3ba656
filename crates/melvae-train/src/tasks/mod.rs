//! [`TrainTask`](crate::TrainTask) implementations of melvae's model families.

pub mod mel_vae;
