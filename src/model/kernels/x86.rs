//! Which vector width our own ops' loops run at on this x86-64 CPU.
//!
//! The binary is built for the x86-64 baseline (SSE2, 4 f32 lanes); the
//! loops of our ops are also compiled with AVX (8 lanes) and AVX-512
//! (16 lanes) enabled and picked at run time. The loops do the same IEEE
//! operations in the same order at every width (no fused multiply-add), so
//! the width changes their speed, never their answers.

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Width {
    Avx512,
    Avx,
    Baseline,
}

/// The widest the CPU has. `EDGEINFER_AVX512=0` stops at AVX, to measure
/// one against the other in the same binary (README "Performance").
pub(super) fn widest() -> Width {
    static WIDEST: OnceLock<Width> = OnceLock::new();
    *WIDEST.get_or_init(|| {
        let avx512_allowed = std::env::var_os("EDGEINFER_AVX512").is_none_or(|v| v != "0");
        if avx512_allowed && std::arch::is_x86_feature_detected!("avx512f") {
            Width::Avx512
        } else if std::arch::is_x86_feature_detected!("avx") {
            Width::Avx
        } else {
            Width::Baseline
        }
    })
}
